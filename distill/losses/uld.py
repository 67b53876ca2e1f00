"""Universal Logit Distillation (ULD; Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs"): a token-level loss between
a teacher and a student whose tokenizers differ, so that their vocabularies, and the
meaning of a logit's index, are not the same.

ULD compares the two next-token distributions without matching tokens: both are sorted
in decreasing order, the shorter vocabulary is padded with zeros to the longer, and the
loss per position is

    ULD(p, q) = Σ_i |p_(i) − q_(i)|          p_(i): the i-th largest teacher probability

the closed form the paper uses for the Wasserstein-1 distance between the two
distributions once each is reordered by rank (its Eq. 5 and released code). It only sees
the *shape* of each distribution (how peaked, how the mass decays with rank), so it is
invariant to any permutation of either vocabulary, is 0 exactly when the sorted
distributions are equal, and lies in [0, 2].

Positions are paired by order, as in the paper: the k-th completion-token prediction of
the student with the k-th of the teacher, each on its own tokenization of the same record,
for k < min(n_teacher, n_student) (both truncated to the shorter). See
:func:`align_completions`.

    uld_distance        (N, Vs), (N, Vt) logits -> (N,) per-position ULD
    align_completions   two loss masks -> the paired rows of each side's selected positions
    chunked_uld_loss    Σ ULD over the pairs and Σ CE over every student target, from hidden
                        states, the output heads applied chunk by chunk (as chunked.py does)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .chunked import _loss_dtype, loss_chunk_rows

__all__ = ["uld_distance", "align_completions", "chunked_uld_loss", "uld_chunk_rows"]


def _sorted_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dim, sorted in decreasing order (float32 or wider)."""
    probabilities = F.softmax(logits.to(_loss_dtype(logits)) / temperature, dim=-1)
    return probabilities.sort(dim=-1, descending=True).values


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-position ULD between student and teacher next-token distributions.

    Args:
        student_logits: (..., Vs) the student's logits over its own vocabulary
        teacher_logits: (..., Vt) the teacher's, over its own (Vt may differ from Vs)
        temperature: both distributions are softmax(logits / T); not T²-scaled here
    Returns:
        (...,) Σ_i |q_(i) − p_(i)| over the sorted, zero-padded probability vectors, in [0, 2].
        Differentiable in both inputs (the sort passes gradients back to the entries it moved).
    """
    student = _sorted_probabilities(student_logits, temperature)
    teacher = _sorted_probabilities(teacher_logits, temperature)
    width = max(student.shape[-1], teacher.shape[-1])
    # Sorted in decreasing order, so the zero padding sits after the smallest probabilities.
    student = F.pad(student, (0, width - student.shape[-1]))
    teacher = F.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum(-1)


def align_completions(student_loss_mask: torch.Tensor,
                      teacher_loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each record's completion-token predictions by order (the paper's alignment).

    Args:
        student_loss_mask: (B, Ls) bool, True at target tokens (``tokenize_for_lm``'s form:
            the state at t predicts token t+1, so row i's targets are ``mask[i, 1:]``)
        teacher_loss_mask: (B, Lt) bool, the same records on the teacher's tokenization
    Returns:
        (student_rows, teacher_rows), each (M,) int64 with M = Σ_i min(n_student_i, n_teacher_i):
        indices into each side's selected positions (the row-major order in which
        :func:`~distill.losses.chunked.shifted` picks them), so ``student_rows[j]`` is the
        k-th target of record i on the student's side and ``teacher_rows[j]`` the k-th on the
        teacher's. Both increase; computed on the CPU tensors given (no device sync).
    """
    if student_loss_mask.shape[0] != teacher_loss_mask.shape[0]:
        raise ValueError("the student and teacher masks must hold the same records (rows)")
    student_counts = student_loss_mask[:, 1:].sum(1)  # (B,) completion tokens per record
    teacher_counts = teacher_loss_mask[:, 1:].sum(1)
    paired = torch.minimum(student_counts, teacher_counts)  # (B,) the shorter completion wins

    def starts(counts: torch.Tensor) -> torch.Tensor:  # where each record's targets begin in the selection
        return torch.cumsum(counts, 0) - counts

    record = torch.repeat_interleave(torch.arange(len(paired)), paired)  # (M,) record of each pair
    k = torch.arange(int(paired.sum())) - starts(paired)[record]  # (M,) position within the record
    return starts(student_counts)[record] + k, starts(teacher_counts)[record] + k


def uld_chunk_rows(student_vocab: int, teacher_vocab: int) -> int:
    """Pairs per chunk: a chunk holds both models' (rows, V) logits, probabilities and sorted
    copies, so it is sized on twice their total vocabulary."""
    return loss_chunk_rows(2 * (student_vocab + teacher_vocab))


def chunked_uld_loss(student_head: nn.Module, student_hidden: torch.Tensor, targets: torch.Tensor,
                     student_vocab: int, student_rows: torch.Tensor, teacher_head: nn.Module,
                     teacher_hidden: torch.Tensor, teacher_vocab: int, temperature: float,
                     chunk: int | None = None, need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (ULD over the M pairs, cross-entropy over all N student targets).

    Args:
        student_hidden: (N, H) student states at its target positions (or (N, Vs) logits)
        targets: (N,) the student's next-token ids (its own tokenization)
        student_vocab / teacher_vocab: each model's logits are cut to its tokenizer's length
            (rows past it, e.g. a head padded to a multiple of 64, are not tokens)
        student_rows: (M,) int64 CPU, increasing: which of the N student positions are paired
            (from :func:`align_completions`)
        teacher_hidden: (M, H) teacher states (or logits) of the pairs, in ``student_rows``
            order, computed without gradient
    Returns:
        two scalars (float32, or float64 for float64 inputs): Σ ULD, Σ CE. The output heads run
        ``chunk`` student positions at a time inside activation checkpoints, so about
        chunk × (Vs + Vt) floats are alive at once; the teacher head is re-run in backward
        (cheaper than keeping its logits). With N = 0 both are 0 and still on the graph.
    """
    dtype = _loss_dtype(student_hidden)
    uld_total = student_hidden[:0].sum(dtype=dtype)
    ce_total = student_hidden[:0].sum(dtype=dtype)
    n = student_hidden.shape[0]
    chunk = chunk or uld_chunk_rows(student_vocab, teacher_vocab)
    starts = range(0, n, chunk)
    # Where each chunk's pairs start, from the CPU indices: no device sync to slice the teacher side.
    bounds = torch.searchsorted(student_rows, torch.tensor([*starts, n])).tolist()
    local_rows = student_rows.to(student_hidden.device)
    # split, as chunked.py does (one backward node); zipped with starts because split of an empty tensor
    # still yields one (empty) part.
    parts = zip(starts, student_hidden.split(chunk), targets.split(chunk))
    for i, (_, hidden_part, target_part) in enumerate(parts):
        pairs = slice(bounds[i], bounds[i + 1])
        # Everything the chunk needs is an argument: checkpoint re-runs it in backward.
        args = (hidden_part, target_part, teacher_hidden[pairs], local_rows[pairs] - i * chunk)
        options = (student_head, teacher_head, student_vocab, teacher_vocab, temperature, need_ce)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            uld, ce = checkpoint(_chunk_loss, *args, *options, use_reentrant=False)
        else:
            uld, ce = _chunk_loss(*args, *options)
        uld_total, ce_total = uld_total + uld, ce_total + ce
    return uld_total, ce_total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor, paired: torch.Tensor,
                student_head: nn.Module, teacher_head: nn.Module, student_vocab: int, teacher_vocab: int,
                temperature: float, need_ce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ ULD, Σ CE) of one chunk: (c, H) → (c, Vs) logits inside, ULD on the ``paired`` rows."""
    logits = student_head(hidden)[..., :student_vocab]  # (c, Vs)
    logits = logits.to(_loss_dtype(logits))
    ce = F.cross_entropy(logits, targets, reduction="sum") if need_ce else logits.new_zeros(())
    if teacher_hidden.shape[0] == 0:
        return logits.new_zeros(()), ce
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)[..., :teacher_vocab]  # (m, Vt)
    return uld_distance(logits.index_select(0, paired), teacher_logits, temperature).sum(), ce
