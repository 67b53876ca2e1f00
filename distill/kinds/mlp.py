"""The ``mlp`` kind: a ``.safetensors`` model file with a ``distill_architecture`` entry."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFormatError
from ..models import MLP, count_parameters, load_model, read_architecture, save_model


class MLPKind:
    name = "mlp"
    export_format = "safetensors"

    def inspect(self, path: Path) -> dict:
        architecture = read_architecture(path)
        load_model(path)  # also checks every value is finite
        return {"format": "mlp", "architecture": architecture.to_dict(), "parameters": architecture.num_parameters,
                "task": "classification", "num_labels": architecture.num_classes}

    def load(self, path: Path, device: torch.device | str = "cpu", task: str | None = None) -> MLP:
        return load_model(path, device)

    def prepare_inputs(self, loaded: MLP, inputs: list) -> dict:
        width = loaded.architecture.input_dim
        for i, row in enumerate(inputs):
            if isinstance(row, str) or len(row) != width:
                raise ModelFormatError(f"inputs[{i}] has {len(row)} features; the model takes {width}",
                                       param=f"inputs[{i}]")
        device = next(loaded.parameters()).device
        return {"features": torch.tensor(inputs, dtype=torch.float32, device=device)}

    def logits(self, loaded: MLP, inputs: dict) -> torch.Tensor:
        return loaded(inputs["features"])

    def count_parameters(self, model: nn.Module) -> int:
        return count_parameters(model)

    def context_length(self, details: dict) -> int | None:
        return None

    def export(self, model: MLP, dest: Path) -> Path:
        """``dest/model.safetensors``."""
        return save_model(model, Path(dest) / "model.safetensors")
