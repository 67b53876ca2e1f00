"""The ``hf`` kind: a Hugging Face transformers directory (config.json, safetensors, tokenizer).

transformers is imported only when a model of this kind is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import count_parameters


class HFKind:
    name = "hf"
    export_format = "hf"

    def inspect(self, path: Path) -> dict:
        from ..hf import inspect_model_dir

        return inspect_model_dir(path)

    def load(self, path: Path, device: torch.device | str = "cpu", task: str | None = None) -> tuple[Any, Any]:
        from ..hf import load_causal_lm, load_classifier, load_tokenizer

        loader = load_classifier if task == "text_classification" else load_causal_lm
        return loader(path, device=device).eval(), load_tokenizer(path)

    def prepare_inputs(self, loaded: tuple[Any, Any], inputs: list) -> dict:
        model, tokenizer = loaded
        device = next(model.parameters()).device
        limit = self.context_length({"context_length": getattr(tokenizer, "model_max_length", None)}) or 4096
        encoded = tokenizer(inputs, return_tensors="pt", padding=True, truncation=True, max_length=min(limit, 4096))
        return dict(encoded.to(device))

    def logits(self, loaded: tuple[Any, Any], inputs: dict) -> torch.Tensor:
        return loaded[0](**inputs).logits

    def count_parameters(self, model: nn.Module) -> int:
        return count_parameters(model)

    def context_length(self, details: dict) -> int | None:
        value = details.get("context_length")
        # Tokenizers without a limit report a huge sentinel (int(1e30)).
        return value if isinstance(value, int) and 0 < value < 1 << 24 else None

    def export(self, model: nn.Module, dest: Path, tokenizer=None, card: str = "") -> Path:
        """A transformers directory at ``dest``. A LoRA student (:mod:`distill.lora`) is saved
        merged, and its adapter folder beside ``dest`` (``dest``-adapter); it is merged afterwards."""
        from ..hf import save_hf
        from ..lora import export_lora, is_lora

        if is_lora(model):
            return export_lora(model, dest, tokenizer, card)
        return save_hf(model, tokenizer, dest, card)
