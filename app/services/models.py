"""Finished models: records, downloads and in-memory serving (predict, completions)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.archive import make_archive
from distill.device import resolve_device
from distill.errors import ModelFormatError
from distill.kinds import get_kind

from .. import storage_keys
from ..config import get_settings
from ..errors import NotFound, Unprocessable
from ..storage import get_storage
from ..tables import ModelRecord
from .common import is_id, paginate, shown_id
from .references import model_path


def get_model(session: Session, tenant: str, model_id: str, param: str = "model_id") -> ModelRecord:
    record = session.get(ModelRecord, model_id) if is_id(model_id) else None
    if record is None or record.tenant_id != tenant:
        raise NotFound(f"no model with id {shown_id(model_id)}", param=param)
    return record


def list_models(session: Session, tenant: str, after: str | None, limit: int):
    return paginate(session, ModelRecord, select(ModelRecord).where(ModelRecord.tenant_id == tenant), after, limit,
                    tenant=tenant)


DOWNLOAD_FORMATS = ("model", "adapter")


def download_file(record: ModelRecord, format: str = "model") -> tuple[Path, str, str, str]:
    """(path, filename, media type, sha256) of what GET .../download sends: the model file, or the
    HF directory archive; with ``format`` "adapter", a LoRA student's PEFT adapter folder archive."""
    if format == "adapter":
        return _adapter_download(record)
    path = get_storage().local_path(record.storage_key)
    if get_kind(record.kind).export_format == "hf":
        return path, f"{record.id}.tar.gz", "application/gzip", record.sha256
    return path, f"{record.id}.safetensors", "application/octet-stream", record.sha256


def _adapter_download(record: ModelRecord) -> tuple[Path, str, str, str]:
    lora = (record.architecture or {}).get("lora") or {}
    if not lora.get("adapter_sha256"):
        raise NotFound(f"model {record.id} has no LoRA adapter (its job did not set student.lora); "
                       "leave format out to download the model", param="format")
    return (get_storage().local_path(storage_keys.adapter_archive(record.id)), f"{record.id}-adapter.tar.gz",
            "application/gzip", lora["adapter_sha256"])


def store_adapter(model_id: str, folder: Path) -> dict:
    """Keep a LoRA student's adapter folder (consumed) and its download archive; returns
    what the model record notes of them (adapter_size_bytes, adapter_sha256)."""
    storage = get_storage()
    archive = make_archive(folder, folder.parent / f"{model_id}-adapter.tar.gz")
    size, sha256 = storage.save_file(storage_keys.adapter_archive(model_id), archive, move=True)
    storage.save_dir(storage_keys.adapter_dir(model_id), folder)
    return {"adapter_size_bytes": size, "adapter_sha256": sha256}


class ModelCache:
    """Loaded models by id, least recently used evicted first; thread-safe. Each entry
    carries a lock so one model serves one request at a time (generation is stateful)."""

    def __init__(self, capacity: int, loader: Callable[[ModelRecord], Any]):
        self.capacity, self.loader = capacity, loader
        self._entries: OrderedDict[str, tuple[Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ModelRecord) -> tuple[Any, threading.Lock]:
        key = f"{record.id}:{record.sha256}"
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        entry = (self.loader(record), threading.Lock())
        with self._lock:
            entry = self._entries.setdefault(key, entry)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry

    def discard(self, model_id: str) -> None:
        """Drop a deleted model's loaded copy now rather than when it is least recently used."""
        with self._lock:
            for key in [k for k in self._entries if k.split(":", 1)[0] == model_id]:
                del self._entries[key]


def _load(record: ModelRecord):
    return get_kind(record.kind).load(model_path(record), resolve_device(get_settings().inference_device), record.task)


_cache: ModelCache | None = None


def model_cache() -> ModelCache:
    global _cache
    if _cache is None:
        _cache = ModelCache(get_settings().model_cache_size, _load)
    return _cache


def _check_count(inputs: list) -> None:
    limit = get_settings().max_predict_inputs
    if len(inputs) > limit:
        raise Unprocessable(f"at most {limit} inputs per request, got {len(inputs)}", param="inputs")


def predict(record: ModelRecord, inputs: list) -> list[dict]:
    _check_count(inputs)
    if record.task == "causal_lm":
        raise Unprocessable("this is a language model: use POST /v1/completions", param="model_id")
    kind = get_kind(record.kind)
    text = record.task == "text_classification"
    if any(isinstance(row, str) != text for row in inputs):
        wanted = "a list of texts" if text else "a list of feature rows (lists of numbers)"
        raise Unprocessable(f"this model takes {wanted}", param="inputs")
    loaded, lock = model_cache().get(record)
    try:
        with lock, torch.no_grad():
            logits = kind.logits(loaded, kind.prepare_inputs(loaded, inputs))
    except ModelFormatError as exc:
        raise Unprocessable(exc.message, param=exc.param or "inputs") from None
    probabilities = torch.softmax(logits.float(), dim=-1)
    labels = probabilities.argmax(-1).tolist()
    return [{"label": label, "probabilities": row} for label, row in zip(labels, probabilities.tolist())]
