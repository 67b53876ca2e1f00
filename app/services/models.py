"""Finished models: records, downloads and in-memory serving (predict, completions).

The /predict hot path (issue 9) touches the database only on a miss: :func:`served_model` answers a
(tenant, model id) this process looked up within ``DISTILL_SERVED_MODEL_CACHE_S`` seconds from memory
(:func:`lookup_served` otherwise, in a worker thread), the loaded model comes from :class:`ModelCache`,
and concurrent requests share one forward (:class:`~.batching.MicroBatcher`). A deleted model is never
served from either cache: deleting it in this process drops both at once (:meth:`ModelCache.discard`),
and every batch first checks that the model's weights are still in storage, which a delete by any
other process removes before it commits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
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
from ..db import session_scope
from .batching import MicroBatcher
from .common import is_id, paginate, shown_id
from .hot_cache import TtlCache
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
    """Loaded models by id, least recently used evicted first, bounded by their bytes (weights and
    buffers) and by count; thread-safe. The entry just loaded is kept even when it alone is over the
    byte budget. Each entry carries a lock so one model serves one request at a time (generation is
    stateful). Ids discarded (deleted models) are remembered so queued predictions get 404.

    ``present(record)``, when given, is asked on a hit by ``get(record, verify=True)`` (/predict, whose
    record may come from a cache): False (the weights are gone from storage: the model was deleted,
    perhaps by another process) discards the entry and raises FileNotFoundError, as a load of a missing
    model does."""

    def __init__(self, capacity: int, loader: Callable[[ModelRecord], Any], capacity_bytes: int | None = None,
                 sizer: Callable[[Any], int] | None = None, present: Callable[[ModelRecord], bool] | None = None):
        self.capacity, self.loader, self.present = capacity, loader, present
        self.capacity_bytes, self.sizer = capacity_bytes, sizer or loaded_bytes
        self._entries: OrderedDict[str, tuple[Any, threading.Lock]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._discarded: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, record: ModelRecord, verify: bool = False) -> tuple[Any, threading.Lock]:
        key = f"{record.id}:{record.sha256}"
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None:
            if verify and self.present is not None and not self.present(record):
                self.discard(record.id)
                raise FileNotFoundError(f"model {record.id} is no longer in storage")
            return entry
        loaded = self.loader(record)
        size = self.sizer(loaded)
        entry = (loaded, threading.Lock())
        with self._lock:
            if key not in self._entries:
                self._sizes[key] = size
            entry = self._entries.setdefault(key, entry)
            self._entries.move_to_end(key)
            total = sum(self._sizes.values())
            while len(self._entries) > 1 and (len(self._entries) > self.capacity or (
                    self.capacity_bytes is not None and total > self.capacity_bytes)):
                old, _ = self._entries.popitem(last=False)
                total -= self._sizes.pop(old, 0)
        return entry

    def discard(self, model_id: str) -> None:
        """Drop a deleted model's loaded copy now rather than when it is least recently used (and this
        process's cached record of it, under any tenant)."""
        with self._lock:
            for key in [k for k in self._entries if k.split(":", 1)[0] == model_id]:
                del self._entries[key]
                self._sizes.pop(key, None)
            self._discarded[model_id] = None
            while len(self._discarded) > 4096:
                self._discarded.popitem(last=False)
        served_cache().discard(lambda key: key[1] == model_id)

    def discarded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._discarded


def loaded_bytes(loaded: Any) -> int:
    """Bytes of a loaded model's parameters and buffers (for hf kinds: the model of (model, tokenizer))."""
    module = loaded[0] if isinstance(loaded, tuple) else loaded
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _load(record: ModelRecord):
    return get_kind(record.kind).load(model_path(record), resolve_device(get_settings().inference_device), record.task)


@lru_cache(maxsize=4096)
def _stored_path(storage: Any, model_id: str, kind: str, storage_key: str) -> Path:
    return model_path(Served(model_id, "", kind, None, storage_key))  # resolving it walks the folders: once


def _in_storage(record: ModelRecord) -> bool:
    """Whether the model's weights are still in storage (one stat() per batch)."""
    return _stored_path(get_storage(), record.id, record.kind, record.storage_key).exists()


_cache: ModelCache | None = None
_batcher: MicroBatcher | None = None
_served: tuple[Any, TtlCache] | None = None


def model_cache() -> ModelCache:
    global _cache
    if _cache is None:
        settings = get_settings()
        _cache = ModelCache(settings.model_cache_size, _load, settings.model_cache_bytes, present=_in_storage)
    return _cache


def served_cache() -> TtlCache:
    """(tenant, model id) -> :class:`Served`, made anew when the settings are (tests reload them)."""
    global _served
    settings = get_settings()
    if _served is None or _served[0] is not settings:
        _served = (settings, TtlCache(settings.served_model_cache_s))
    return _served[1]


def predict_batcher() -> MicroBatcher:
    global _batcher
    if _batcher is None:
        settings = get_settings()
        threads = settings.predict_torch_threads
        _batcher = MicroBatcher(settings.predict_max_batch, settings.predict_max_wait_ms / 1000,
                                settings.predict_max_queue,
                                initializer=(lambda: torch.set_num_threads(threads)) if threads else None)
    return _batcher


def _check_count(inputs: list) -> None:
    limit = get_settings().max_predict_inputs
    if len(inputs) > limit:
        raise Unprocessable(f"at most {limit} inputs per request, got {len(inputs)}", param="inputs")


def _check_request(record: ModelRecord, inputs: list) -> None:
    _check_count(inputs)
    if record.task == "causal_lm":
        raise Unprocessable("this is a language model: use POST /v1/completions", param="model_id")
    text = record.task == "text_classification"
    if any(isinstance(row, str) != text for row in inputs):
        wanted = "a list of texts" if text else "a list of feature rows (lists of numbers)"
        raise Unprocessable(f"this model takes {wanted}", param="inputs")


def _forward(kind, loaded, inputs: list) -> torch.Tensor:
    """Probabilities (B, C) of ``inputs`` (text rows padded to the longest, with the attention mask)."""
    with torch.no_grad():
        return torch.softmax(kind.logits(loaded, kind.prepare_inputs(loaded, inputs)).float(), dim=-1)


def _rows(probabilities: torch.Tensor) -> list[dict]:
    labels = probabilities.argmax(-1).tolist()
    return [{"label": label, "probabilities": row} for label, row in zip(labels, probabilities.tolist())]


def _one(kind, loaded, inputs: list) -> list[dict] | Exception:
    try:
        return _rows(_forward(kind, loaded, inputs))
    except ModelFormatError as exc:
        return Unprocessable(exc.message, param=exc.param or "inputs")
    except Exception as exc:  # noqa: BLE001 - this request's failure, not its neighbours'
        return exc


def run_batch(record: ModelRecord, requests: list[list]) -> list[list[dict] | Exception]:
    """Several requests' rows for one model as one forward; per request its predictions or its error.
    When the joint forward fails (a bad row somewhere), each request runs alone, so an error names the
    row of its own request (``inputs[i]``) and never fails its neighbours."""
    cache = model_cache()
    if cache.discarded(record.id):
        return [NotFound(f"no model with id {record.id}", param="model_id")] * len(requests)
    try:
        loaded, lock = cache.get(record, verify=True)
    except FileNotFoundError:  # deleted while the request waited, or by another process
        return [NotFound(f"no model with id {record.id}", param="model_id")] * len(requests)
    kind = get_kind(record.kind)
    with lock:
        if len(requests) == 1:
            return [_one(kind, loaded, requests[0])]
        try:
            probabilities = _forward(kind, loaded, [row for rows in requests for row in rows])
        except Exception:  # noqa: BLE001 - attributed per request below
            return [_one(kind, loaded, rows) for rows in requests]
    out, start = [], 0
    rows = _rows(probabilities)
    for request in requests:
        out.append(rows[start:start + len(request)])
        start += len(request)
    return out


def predict(record: ModelRecord, inputs: list) -> list[dict]:
    """Predictions for one request, run at once in the calling thread (no batching)."""
    _check_request(record, inputs)
    result = run_batch(record, [inputs])[0]
    if isinstance(result, Exception):
        raise result
    return result


@dataclass(frozen=True)
class Served:
    """What serving needs of a model record, detached from its database session (a batch may run
    after the request that queued it has released its connection)."""
    id: str
    sha256: str
    kind: str
    task: str | None
    storage_key: str

    @classmethod
    def of(cls, record: ModelRecord) -> "Served":
        return cls(record.id, record.sha256, record.kind, record.task, record.storage_key)


def served_model(tenant: str, model_id: str) -> Served | None:
    """The tenant's model as this process found it within the cache's TTL; None: look it up."""
    return served_cache().get((tenant, model_id))


def lookup_served(tenant: str, model_id: str) -> Served:
    """The tenant's model (404 if it has none by that id) from the database, in a session of its own
    (blocking: call it from a worker thread), and kept in the cache."""
    cache = served_cache()
    generation = cache.generation()
    with session_scope() as session:
        served = Served.of(get_model(session, tenant, model_id))
    cache.put((tenant, model_id), served, generation=generation)
    return served


async def predict_async(record: ModelRecord | Served, inputs: list) -> list[dict]:
    """Predictions for one request, micro-batched with concurrent requests for the same model
    (the forward runs in a worker thread; the event loop only waits)."""
    _check_request(record, inputs)
    key = f"{record.id}:{record.sha256}"
    return await predict_batcher().submit(key, inputs, lambda requests: run_batch(record, requests))
