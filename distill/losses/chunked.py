"""The token-level LM loss over hidden states, chunked and checkpointed: the one
implementation that training, validation and the benchmarks use.

The models run up to their last hidden states (N, H) at the positions that count; the
output heads are applied ``chunk`` positions at a time inside activation checkpoints,
so the loss keeps about ``chunk × V`` floats alive at a time instead of N × V for each
model. The teacher side is either a precomputed :class:`TopKSignal` (the teacher ran
once, before training) or (teacher_head, teacher_hidden), whose head is re-run in
backward (cheaper in memory than keeping its (chunk, V) logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .token import TopKSignal, token_divergence

__all__ = ["chunked_lm_loss", "loss_chunk_rows", "LOSS_CHUNK_FLOATS", "shifted"]

LOSS_CHUNK_FLOATS = 1 << 24  # ~64 MiB of float32 logits per chunk per model, whatever the vocabulary


def loss_chunk_rows(vocab: int) -> int:
    """Positions per loss chunk, sized so one chunk's (rows, V) logits stay near LOSS_CHUNK_FLOATS."""
    return max(16, min(512, LOSS_CHUNK_FLOATS // max(vocab, 1)))


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """Half precision is upcast to float32 for the loss (log-softmax over a large vocabulary in bf16
    loses most of the tail); float32 and float64 stay."""
    return torch.promote_types(x.dtype, torch.float32)


def shifted(hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """States at t predict token t+1: returns (N, H) states and (N,) targets where loss_mask[t+1]."""
    select = loss_mask[:, 1:]  # (B, L-1)
    return hidden[:, :-1][select], input_ids[:, 1:][select]


def chunked_lm_loss(student_head: nn.Module, student_hidden: torch.Tensor, targets: torch.Tensor,
                    teacher: TopKSignal | tuple[nn.Module, torch.Tensor] | None, shared: int, loss_type: str,
                    temperature: float, beta: float, chunk: int | None = None,
                    need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (divergence, cross-entropy) over N selected positions.

    Args:
        student_hidden: (N, H) student states at the positions that count (or (N, V) logits)
        targets: (N,) next-token ids
        teacher: a TopKSignal (N, k), or (teacher_head, teacher_hidden (N, H)), or None (CE only)
        shared: vocabulary entries both models share (a padded head is cut to this)
    Returns:
        two float32 scalars (float64 for float64 inputs): Σ divergence (not T²-scaled), Σ cross-entropy. With N = 0 both
        are exactly 0 and still connected to ``student_hidden``, so backward works.
    """
    # Start from an empty slice's sum: 0, on the graph, so an empty selection can still backward.
    dtype = _loss_dtype(student_hidden)
    kd_total = student_hidden[:0].sum(dtype=dtype)
    ce_total = student_hidden[:0].sum(dtype=dtype)
    chunk = chunk or loss_chunk_rows(shared)
    # split (one backward node that concatenates the chunks' gradients) rather than slicing
    # (each slice's backward would zero-fill a full-size gradient: N × V when the input is logits).
    chunks = zip(range(0, student_hidden.shape[0], chunk), student_hidden.split(chunk), targets.split(chunk))
    for start, hidden_part, target_part in chunks:
        rows = slice(start, start + chunk)
        teacher_part = teacher[rows] if isinstance(teacher, TopKSignal) else \
            teacher[1][rows] if isinstance(teacher, tuple) else None
        # Everything a chunk needs is an argument: checkpoint re-runs the function in backward,
        # after this loop has moved on, so a closure over loop variables would see the last chunk.
        args = (hidden_part, target_part, teacher_part)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            kd, ce = checkpoint(_chunk_loss, *args, student_head, teacher, shared, loss_type, temperature, beta,
                                need_ce, use_reentrant=False)
        else:
            kd, ce = _chunk_loss(*args, student_head, teacher, shared, loss_type, temperature, beta, need_ce)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    return kd_total, ce_total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, teacher_part, student_head: nn.Module, teacher,
                shared: int, loss_type: str, temperature: float, beta: float,
                need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ divergence, Σ CE) of one chunk: hidden (c, H) → logits (c, V) inside, so only c × V is live."""
    logits = student_head(hidden)[..., :shared]  # (c, V)
    logits = logits.to(_loss_dtype(logits))
    ce = F.cross_entropy(logits, targets, reduction="sum") if need_ce else logits.new_zeros(())
    if teacher_part is None:
        return logits.new_zeros(()), ce
    if isinstance(teacher_part, TopKSignal):
        return token_divergence(logits, teacher_part, loss_type, temperature, beta).sum(), ce
    with torch.no_grad():  # recomputed in backward from (c, H): cheaper than keeping (c, V)
        teacher_logits = teacher[0](teacher_part)[..., :shared]
        teacher_logits = teacher_logits.to(_loss_dtype(teacher_logits))
    return token_divergence(logits, teacher_logits, loss_type, temperature, beta).sum(), ce
