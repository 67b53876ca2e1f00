"""Distillation losses: plain functions on logits, and a registry of them.

Shapes: ``student_logits`` and ``teacher_logits`` are (N, C) — one row per sample
(later: per token position), C classes. ``labels`` is (N,) int64 or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .token import token_kd_loss

__all__ = ["forward_kl", "distillation_loss"]


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened distributions, scaled by T².

    Equal to ``KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2``:
    summed over classes, averaged over rows. The T² keeps gradient magnitudes
    comparable across temperatures (Hinton et al., 2015).

    Args:
        student_logits: (N, C)
        teacher_logits: (N, C), treated as constants (detached): no gradient reaches the teacher
        temperature: T > 0
    Returns:
        scalar tensor; 0 for an empty batch (not NaN).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    soft_loss: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """The job loss: ``alpha * soft + (1 - alpha) * cross_entropy(student, labels)``.

    ``soft`` is the chosen divergence (forward_kl, reverse_kl, jsd with ``beta``, tvd)
    between the temperature-softened distributions, scaled by T², averaged over rows.
    Without labels (an unlabeled transfer set, which the teacher labels) it is the
    pure soft-target loss, whatever alpha says.
    """
    if soft_loss == "forward_kl":
        soft = forward_kl(student_logits, teacher_logits, temperature)
    else:
        every_row = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
        soft = token_kd_loss(student_logits, teacher_logits, every_row, soft_loss, temperature, beta)
    if labels is None or alpha >= 1.0 or labels.numel() == 0:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard
