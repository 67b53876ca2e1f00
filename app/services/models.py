"""Finished students: records, files and in-memory serving."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.device import resolve_device
from distill.models import MLP, load_model

from ..config import get_settings
from ..errors import NotFound, Unprocessable
from ..storage import get_storage
from ..tables import ModelRecord
from .common import paginate


def get_model(session: Session, tenant: str, model_id: str) -> ModelRecord:
    record = session.get(ModelRecord, model_id)
    if record is None or record.tenant_id != tenant:
        raise NotFound(f"no model with id {model_id!r}", param="model_id")
    return record


def list_models(session: Session, tenant: str, after: str | None, limit: int):
    return paginate(session, ModelRecord, select(ModelRecord).where(ModelRecord.tenant_id == tenant), after, limit)


def model_file(record: ModelRecord) -> Path:
    return get_storage().local_path(record.storage_key)


class ModelCache:
    """Loaded models by id, least recently used evicted first; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, MLP] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ModelRecord) -> MLP:
        key = f"{record.id}:{record.sha256}"
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load_model(model_file(record), resolve_device(get_settings().inference_device))
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        return model


_cache: ModelCache | None = None


def model_cache() -> ModelCache:
    global _cache
    if _cache is None:
        _cache = ModelCache(get_settings().model_cache_size)
    return _cache


def predict(record: ModelRecord, inputs: list[list[float]]) -> list[dict]:
    limit = get_settings().max_predict_inputs
    if len(inputs) > limit:
        raise Unprocessable(f"at most {limit} inputs per request, got {len(inputs)}", param="inputs")
    model = model_cache().get(record)
    width = model.architecture.input_dim
    for i, row in enumerate(inputs):
        if len(row) != width:
            raise Unprocessable(f"inputs[{i}] has {len(row)} features; the model takes {width}", param=f"inputs[{i}]")
    device = next(model.parameters()).device
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.tensor(inputs, dtype=torch.float32, device=device)), dim=-1)
    labels = probabilities.argmax(-1).tolist()
    return [{"label": label, "probabilities": row} for label, row in zip(labels, probabilities.tolist())]
