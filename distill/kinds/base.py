"""The interface every model kind implements."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class ModelKind(Protocol):
    name: str
    """Stored in the ``kind`` column of files and models."""
    export_format: str
    """What ``export`` writes: 'safetensors' (one file) or 'hf' (a directory)."""

    def inspect(self, path: Path) -> dict:
        """Check the model at ``path`` without running it and describe it (the stored details:
        task, parameters, sizes, context length). Raises ModelFormatError naming what is wrong."""

    def load(self, path: Path, device: torch.device | str = "cpu", task: str | None = None) -> Any:
        """The model ready to run in eval mode on ``device`` (for hf: (model, tokenizer))."""

    def prepare_inputs(self, loaded: Any, inputs: list) -> dict:
        """Raw request inputs (feature rows, texts) as the model's forward kwargs, on its device."""

    def logits(self, loaded: Any, inputs: dict) -> torch.Tensor:
        """Forward to logits: (B, C) for classifiers, (B, L, V) for language models."""

    def count_parameters(self, model: nn.Module) -> int:
        """Distinct parameters (tied weights once)."""

    def context_length(self, details: dict) -> int | None:
        """The longest input in tokens the model takes, or None when unbounded/not a sequence model."""
