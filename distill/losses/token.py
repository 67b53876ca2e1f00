"""Token-level distillation losses for language models: plain functions on logits.

A causal LM produces one distribution over the vocabulary per token position, so the
classic soft-target loss (``distill.losses``) becomes a per-position divergence between
the teacher's and the student's next-token distributions, averaged over the positions
that count (``mask``: response tokens, not padding and usually not the prompt).

Shapes: ``student_logits`` is (..., V), e.g. (B, T, V); the teacher is either logits of
the same shape or a :class:`TopKSignal` (..., k) — the teacher's k most likely tokens with
their log-probabilities; ``mask`` is (...) bool. Positions where ``mask`` is False are
dropped *before* any (N, V) work, so compute and memory scale with real tokens, not
padding.

Divergences (``LOSS_TYPES``), with p the teacher and q the student distribution, both at
temperature T (``log_softmax(logits / T)`` in float32 — half-precision inputs are upcast
one chunk at a time; float64 stays float64):

- ``forward_kl``  KL(p‖q) = Σ p (log p − log q). Mass-covering: the student is punished
  for putting little mass where the teacher puts much. The classic KD loss.
- ``reverse_kl``  KL(q‖p) = Σ q (log q − log p). Mode-seeking: the student is punished
  for putting mass where the teacher puts little (MiniLLM).
- ``jsd``         the generalized Jensen–Shannon divergence of TRL's GKD trainer
  (``generalized_jsd_loss``, Agarwal et al. 2024): with m = β p + (1 − β) q,
  JSD_β = β KL(p‖m) + (1 − β) KL(q‖m); β = 0 is special-cased to forward KL and β = 1 to
  reverse KL, as TRL does. Note the mixed formula itself tends to 0 at both ends
  (JSD_β ≈ β KL(p‖q) for small β), so the loss *scale* jumps at β = 0 and β = 1: an
  "almost forward KL" β = 0.01 gives a loss ~100× smaller than β = 0.
- ``tvd``         total variation distance ½ Σ |p − q| (bounded by 1, so one confidently
  wrong position cannot dominate the batch; used in f-divergence KD, Wen et al. 2023).

The teacher side is always detached: no gradient reaches the teacher.
:func:`token_divergence` returns the per-position divergence; :func:`token_kd_loss`
averages it over the masked-in positions and multiplies by T² (Hinton et al.: keeps
gradient magnitudes comparable across temperatures).

Top-k teacher signal and the tail bucket
----------------------------------------
Storing or shipping full teacher logits costs N × V floats (V = 32k–256k), so the
teacher is often kept as its top-k (:func:`teacher_topk`). Its log-probabilities are over
the FULL vocabulary, so they sum to Σ p_i ≤ 1 and the rest, p_tail = 1 − Σ p_i, is the
mass the teacher puts on every other token. We compare the two models on k + 1
"buckets": the k teacher tokens, plus one tail bucket holding everything else:

    teacher: p_1 .. p_k, p_tail = 1 − Σ p_i
    student: q_1 .. q_k (the student's full-vocabulary probabilities at the same token
             ids), q_tail = Σ of the student's probabilities at all other ids

and compute the chosen divergence between these two (k+1)-bucket distributions. Why:

- Both sides are proper probability distributions, so the result is a proper divergence
  (≥ 0, 0 iff the buckets agree). Renormalising the teacher's top-k instead would tell
  the student the teacher is more confident than it is; summing over the top-k only
  (no tail) is not a divergence at all — it can go negative and never penalises mass the
  student puts outside the teacher's top-k.
- The student is pushed to put the same *total* mass on the tail as the teacher, without
  being told how to spread it over the tail tokens (the teacher's signal says nothing
  about that).
- With k = V the tail is empty on both sides and the loss equals the full-logit loss.

Numerics of the tail: q_tail is summed directly over the student's non-top-k
probabilities (no ``1 − Σ q_i`` cancellation, so a small tail is still accurate to float32
relative precision); p_tail can only be ``1 − Σ p_i`` (clamped at ≥ 0) since that is all
the signal holds. Both are then floored at ``TAIL_EPS`` before the log, so an empty tail
(k = V, or a teacher whose top-k holds all its mass) gives log(eps) on both sides and
contributes exactly 0 instead of 0·log 0 = NaN or a reverse-KL of +inf for float32 noise
in p_tail. The price: a student tail below ``TAIL_EPS`` gets no gradient through the tail
bucket.

The teacher log-probabilities in a ``TopKSignal`` are already at the temperature they were
made with; ``temperature`` only softens the student. Make the signal with the same T.

Memory: unchunked, the loss's own (N, V) float32 intermediates (upcast logits,
log-softmax, the teacher's probabilities, their gradients) peak at about 5 × N × V × 4
bytes for full teacher logits and 4 × for a top-k signal (forward KL), on top of the
inputs. With ``chunk_size`` the positions are processed in chunks of rows, each under
activation checkpointing: the forward pass keeps only the inputs and the backward pass
recomputes one chunk at a time, so the intermediates are O(chunk_size × V). What remains
O(N × V) is the gradient of the student logits, which autograd briefly holds twice (the
chunks' gradients, then their concatenation): ~2.6 × N × V × 4 bytes in all at
chunk_size = N/8 (float32 logits). Chunking recomputes each chunk's forward in backward
(more FLOPs), yet on CPU it measured faster than unchunked: its chunk-sized buffers are
reused, while unchunked pays page faults on fresh (N, V) ones every step. GPU timings are
unmeasured. See ``benchmarks/bench_loss_memory.py``.

Student logits must be finite (every real LM head's are). Teacher logits may contain
−inf (e.g. masked vocabulary entries): teacher log-probabilities are floored at
``LOG_PROB_FLOOR`` so 0·log 0 terms are 0, not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import DIVERGENCES, LOSS_TYPES, get_divergence

__all__ = ["LOSS_TYPES", "TopKSignal", "teacher_topk", "token_divergence", "token_kd_loss", "TAIL_EPS"]

# Floor for the tail masses of the top-k signal (see the module docstring).
TAIL_EPS = 1e-8
# Floor for teacher log-probabilities: exp(-1e4) is 0 in every float format, so a floored
# entry still has probability 0, but its log is finite and 0 * finite = 0 (not NaN).
LOG_PROB_FLOOR = -1e4
# teacher_topk converts this many rows to float32 at a time, so it never holds a float32
# copy of the teacher's full (N, V) logits.
_TOPK_ROWS_PER_BLOCK = 1024


@dataclass
class TopKSignal:
    """The teacher's top-k at a temperature: log-probabilities over the FULL vocabulary
    (so ``sum(exp(logprobs)) <= 1`` and the rest is the tail mass), and their token ids.

    ``tail_logprob`` (optional) is log of the tail mass itself, summed from the teacher's
    full distribution when the signal was made. Without it the tail is ``1 − Σ p_i``,
    which is only as exact as the stored log-probabilities: on a near-flat teacher a
    float16 store leaves the tail off by ~1e-3 relative, enough to move a reverse KL by
    tens of percent. :func:`teacher_topk` always fills it.

    Indexing (``signal[mask]``, ``signal[i:j]``) indexes every tensor the same way, over the
    leading (position) dimensions.
    """

    logprobs: torch.Tensor  # (..., k) float
    indices: torch.Tensor  # (..., k) int64 or int32
    tail_logprob: torch.Tensor | None = None  # (...,) float

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape:
            raise ValueError(
                f"TopKSignal: logprobs {tuple(self.logprobs.shape)} and indices "
                f"{tuple(self.indices.shape)} differ in shape"
            )
        if self.logprobs.ndim < 1:
            raise ValueError("TopKSignal: needs at least one (k) dimension")
        if not self.logprobs.is_floating_point():
            raise ValueError(f"TopKSignal: logprobs must be floating point, got {self.logprobs.dtype}")
        if self.indices.is_floating_point() or self.indices.dtype == torch.bool:
            raise ValueError(f"TopKSignal: indices must be integer token ids, got {self.indices.dtype}")
        if self.tail_logprob is not None and self.tail_logprob.shape != self.logprobs.shape[:-1]:
            raise ValueError(f"TopKSignal: tail_logprob {tuple(self.tail_logprob.shape)} must have the positions' "
                             f"shape {tuple(self.logprobs.shape[:-1])}")

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading (position) shape, without k."""
        return self.logprobs.shape[:-1]

    def bytes_per_position(self) -> int:
        tail = self.tail_logprob.element_size() if self.tail_logprob is not None else 0
        return self.k * (self.logprobs.element_size() + self.indices.element_size()) + tail

    def __getitem__(self, index) -> "TopKSignal":
        tail = self.tail_logprob[index] if self.tail_logprob is not None else None
        return TopKSignal(self.logprobs[index], self.indices[index], tail)

    def to(self, device) -> "TopKSignal":
        tail = self.tail_logprob.to(device) if self.tail_logprob is not None else None
        return TopKSignal(self.logprobs.to(device), self.indices.to(device), tail)

    def reshape(self, *shape: int) -> "TopKSignal":
        """Reshape the position dims (k stays last)."""
        tail = self.tail_logprob.reshape(*shape) if self.tail_logprob is not None else None
        return TopKSignal(self.logprobs.reshape(*shape, self.k), self.indices.reshape(*shape, self.k), tail)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKSignal:
    """The teacher's k most likely tokens at temperature T, as a :class:`TopKSignal`.

    ``log_softmax(teacher_logits / T)`` over the full vocabulary (float32, or float64 for
    float64 logits), then the top k
    over the last dim (sorted, most likely first). No gradient: this is a target.

    Args:
        teacher_logits: (..., V), any float dtype
        k: 1 <= k <= V
        temperature: T > 0; use the same T for the loss
    Returns:
        TopKSignal with logprobs (..., k) float32 (float64 for float64 logits) and indices
        (..., k) int64, on the logits' device.
    """
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
    lead = teacher_logits.shape[:-1]
    rows = teacher_logits.detach().reshape(-1, vocab)
    out_dtype = torch.promote_types(rows.dtype, torch.float32)
    logprobs, indices, tails = [], [], []
    # Rows per block: one (rows, V) working copy, a few MiB so that it stays in cache.
    block_rows = max(1, min(_TOPK_ROWS_PER_BLOCK, (1 << 21) // vocab))
    with torch.no_grad():
        for block in rows.split(block_rows):
            scaled = _upcast(block) / temperature  # a copy: worked on in place below
            values, ids = scaled.topk(k, dim=-1)  # same order as the log-probabilities'
            # The tail is summed directly, not taken as 1 - Σ p_top: on a near-flat teacher it
            # holds almost all the mass and on a peaked one almost none, and 1 - Σ p_top from a
            # float32 log-softmax is ~1e-6 off in both, tens of percent of a small divergence.
            # exp(s - max) outside the top k (the top k zeroed), summed by torch's cascade sum,
            # is good to ~1e-7 relative; the top k's own terms are taken in float64.
            shift = values[..., :1]
            exps = scaled.sub_(shift).exp_().scatter_(-1, ids, 0.0)
            tail_sum = exps.sum(-1).double()
            top = values.double() - shift.double()
            log_total = torch.log(tail_sum + top.exp().sum(-1))
            logprobs.append((top - log_total.unsqueeze(-1)).to(out_dtype))
            indices.append(ids)
            tails.append((tail_sum.log() - log_total).to(out_dtype))
    return TopKSignal(torch.cat(logprobs).reshape(*lead, k), torch.cat(indices).reshape(*lead, k),
                      torch.cat(tails).reshape(lead))


def token_divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKSignal,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between teacher and student, temperature-softened, NOT
    yet scaled by T².

    Args:
        student_logits: (N, V), any float dtype (half precision is upcast to float32 here)
        teacher: logits (N, V) (detached here), or a TopKSignal with (N, k) made at the
            same temperature (compared on k + 1 buckets, see the module docstring)
        loss_type: one of LOSS_TYPES
        temperature: T > 0; softens the student (and full teacher logits)
        beta: jsd only, in [0, 1]: 0 = forward KL, 1 = reverse KL
    Returns:
        (N,) float32 (float64 for float64 inputs), >= 0 up to rounding. Any leading shape works: (...,) for (..., V).
    """
    _check_options(loss_type, temperature, beta)
    _check_teacher(student_logits, teacher)
    log_p, log_q = _bucket_log_probs(student_logits, teacher, temperature)
    return _divergence(log_p, log_q, loss_type, beta)


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKSignal,
    mask: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The token-level KD loss: T² × the mean of :func:`token_divergence` over the
    positions where ``mask`` is True.

    Every masked-in token weighs the same (a mean over tokens of the whole batch, not a
    mean of per-sequence means), so long responses weigh more than short ones.

    Args:
        student_logits: (..., V), e.g. (B, T, V)
        teacher: logits of the same shape (detached here), or a TopKSignal (..., k)
        mask: (...) bool, e.g. (B, T); False positions never count (their logits get a
            zero gradient, whatever they hold)
        loss_type, temperature, beta: as in :func:`token_divergence`
        chunk_size: None = all positions at once; an int = that many positions per chunk,
            each chunk under activation checkpointing (recomputed in backward), so the
            loss's (rows, V) intermediates exist for one chunk at a time. Same value and
            gradients as unchunked, up to float rounding.
    Returns:
        scalar float32 (float64 for float64 logits). An all-masked batch gives exactly 0 (not NaN) that is still
        connected to ``student_logits``, so ``.backward()`` works (zero gradients).
    """
    _check_options(loss_type, temperature, beta)
    _check_teacher(student_logits, teacher)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        # Strict on purpose: an int attention mask or a labels tensor (with -100) would be
        # silently misread by a "!= 0".
        raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be student_logits' shape without the vocabulary dim, "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    # Keep only the real positions, before any (N, V) float32 work. All-True masks (the
    # common case for packed batches) skip the copy that boolean indexing makes.
    vocab = student_logits.shape[-1]
    flat_mask = mask.reshape(-1)
    student = student_logits.reshape(-1, vocab)
    if isinstance(teacher, TopKSignal):
        teacher = teacher.reshape(-1)
    else:
        teacher = teacher.reshape(-1, vocab)
    n = int(flat_mask.sum())
    if n == 0:
        # An empty slice's sum: exactly 0 even if the logits hold inf/NaN (0 * x would not),
        # and part of the graph, so backward works and gives zero gradients.
        return student_logits.reshape(-1)[:0].sum(dtype=torch.promote_types(student_logits.dtype, torch.float32))
    if n < flat_mask.numel():
        student = student[flat_mask]
        teacher = teacher[flat_mask]

    if chunk_size is None or chunk_size >= n:
        total = _divergence_sum(student, teacher, loss_type, temperature, beta)
    else:
        # The one chunked, checkpointed implementation (distill.losses.chunked), with the
        # logits as the "hidden states" and no output head to apply.
        from .chunked import chunked_lm_loss

        teacher_side = teacher if isinstance(teacher, TopKSignal) else (torch.nn.Identity(), teacher.detach())
        no_targets = torch.zeros(n, dtype=torch.long, device=student.device)
        total, _ = chunked_lm_loss(torch.nn.Identity(), student, no_targets, teacher_side, vocab, loss_type,
                                   temperature, beta, chunk=chunk_size, need_ce=False)
    return total * (temperature**2 / n)


# --------------------------------------------------------------------------- internals


def _divergence_sum(student, teacher, loss_type, temperature, beta) -> torch.Tensor:
    log_p, log_q = _bucket_log_probs(student, teacher, temperature)
    return _divergence(log_p, log_q, loss_type, beta).sum()


def _bucket_log_probs(
    student_logits: torch.Tensor, teacher: torch.Tensor | TopKSignal, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over the buckets the divergence is computed on: the V vocabulary
    entries for teacher logits, the k top-k tokens + 1 tail bucket for a TopKSignal."""
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    if not isinstance(teacher, TopKSignal):
        log_p = F.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1).clamp_min(LOG_PROB_FLOOR)
        return log_p, log_q

    indices = teacher.indices.long()
    log_p_top = _upcast(teacher.logprobs.detach()).clamp_min(LOG_PROB_FLOOR)
    if teacher.tail_logprob is not None:
        log_p_tail = _upcast(teacher.tail_logprob.detach()).unsqueeze(-1).clamp_min(math.log(TAIL_EPS))
    else:
        log_p_tail = (1.0 - log_p_top.exp().sum(-1, keepdim=True)).clamp_min(TAIL_EPS).log()
    log_q_top = log_q.gather(-1, indices)
    # Sum the student's tail directly (zero out the top-k, add up the rest): accurate for a
    # small tail, where 1 - sum(q_top) would be mostly rounding error.
    q_tail = log_q.exp().scatter(-1, indices, 0.0).sum(-1, keepdim=True)
    log_p = torch.cat([log_p_top, log_p_tail], dim=-1)
    log_q = torch.cat([log_q_top, q_tail.clamp_min(TAIL_EPS).log()], dim=-1)
    return log_p, log_q


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 (log-softmax over a large vocabulary in bf16 loses most of
    the tail); float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss_type: str, beta: float) -> torch.Tensor:
    return get_divergence(loss_type)(log_p, log_q, beta)


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_options(loss_type: str, temperature: float, beta: float) -> None:
    if loss_type not in DIVERGENCES:
        raise ValueError(f"loss_type must be one of {tuple(DIVERGENCES)}, got {loss_type!r}")
    _check_temperature(temperature)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")


def _check_teacher(student_logits: torch.Tensor, teacher: torch.Tensor | TopKSignal) -> None:
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary dimension")
    if isinstance(teacher, TopKSignal):
        if teacher.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"TopKSignal positions {tuple(teacher.shape)} must match student_logits' "
                f"{tuple(student_logits.shape[:-1])}"
            )
        if teacher.k > student_logits.shape[-1]:
            raise ValueError(f"TopKSignal has k={teacher.k} > the student's vocabulary {student_logits.shape[-1]}")
    elif isinstance(teacher, torch.Tensor):
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} must have the student's shape {tuple(student_logits.shape)}"
            )
    else:
        raise ValueError(f"teacher must be a tensor of logits or a TopKSignal, got {type(teacher).__name__}")
