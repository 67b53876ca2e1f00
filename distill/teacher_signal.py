"""Teacher inference, kept a step of its own.

A deterministic teacher on fixed inputs gives the same logits every epoch, so the
loop asks for them once and reuses them: one teacher forward per sample for the
whole job instead of one per sample per epoch (the usual online KD loop).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compute_logits"]


@torch.no_grad()
def compute_logits(model: nn.Module, features: torch.Tensor, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    """Logits of ``model`` on every row, in eval mode, batched.

    Args:
        features: (N, D) float32, on any device
    Returns:
        (N, C) float32 on ``device``; memory N*C*4 bytes.
    """
    was_training = model.training
    model.eval()
    chunks = [model(features[start : start + batch_size].to(device)).float() for start in range(0, len(features), batch_size)]
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, device=device)
