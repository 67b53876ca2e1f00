"""Model kinds behind one small interface (:class:`ModelKind`): ``mlp`` (our safetensors
MLP format) and ``hf`` (a Hugging Face transformers directory). The service, the worker
and the recipes ask a kind to inspect, load, run, count and export a model instead of
checking format strings; a new kind (ONNX teachers, embeddings, ...) is one class here.

The kind of an uploaded file or a finished model is stored in its row's ``kind`` column.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from .base import ModelKind
from .hf import HFKind
from .mlp import MLPKind

__all__ = ["ModelKind", "KINDS", "get_kind", "kind_of_path"]

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (MLPKind(), HFKind())}


def get_kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ModelFormatError(f"unknown model kind {name!r}; known: {', '.join(KINDS)}", param="kind") from None


def kind_of_path(path: str | Path) -> ModelKind:
    """A directory is a transformers model; a file is an MLP model file."""
    return KINDS["hf"] if Path(path).is_dir() else KINDS["mlp"]
