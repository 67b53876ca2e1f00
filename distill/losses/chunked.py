"""The token-level LM loss over hidden states: the one implementation that training,
validation and the benchmarks use, with four ways (paths) to compute it.

The models run up to their last hidden states (N, H) at the positions that count; the loss
needs the output heads' (N, V) logits, which dominate memory (and much of the time) at
vocabularies of 32k–256k. The teacher side is one of:

- a :class:`TopKSignal` (N, k): the teacher ran once before training (or came from the
  teacher-signal store);
- a tensor (N, V) of teacher logits (any float dtype, e.g. the float16 full-vocabulary
  signal of the store), upcast one chunk at a time;
- (teacher_head, teacher_hidden (N, H)): the teacher's head is applied here, chunk by chunk,
  under no_grad;
- None: cross-entropy only.

Paths (:data:`LOSS_PATHS`); every one gives the same value and the same gradients (tested):

``fused``         (the default while training) a custom autograd function that computes, in
                  the forward pass and one chunk of positions at a time, the student's
                  chunk logits, the loss, its gradient with respect to the logits, and from
                  that the gradients of the hidden states and of the head's parameters
                  (Liger-Kernel's fused-linear trick, in plain PyTorch). Nothing of size
                  (N, V) is kept for backward and nothing is recomputed: backward only scales
                  the stored gradients. The teacher head runs once per chunk. Works for any
                  head module (a plain ``nn.Linear`` takes a matmul fast path; others, e.g.
                  LoRA-wrapped heads, go through autograd per chunk). It returns the weighted
                  total ``kd_weight·KD + ce_weight·CE``, which is what it differentiates.
``materialized``  full (N, V) logits for both models and plain autograd: the most memory,
                  the simplest graph.
``chunked``       per-chunk logits kept by autograd for backward (the teacher's too):
                  bounded working set while computing, N × V saved for backward.
``checkpointed``  per-chunk logits inside activation checkpoints: ``chunk × V`` live at a
                  time, at the price of re-running the student head in backward (and, for an
                  online teacher, the teacher head). The smallest memory without the fused
                  function; kept as the reference low-memory path.

``auto`` picks ``fused`` when gradients are needed and plain per-chunk evaluation (no
autograd state at all) when they are not. :func:`choose_path` documents the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .token import TopKSignal, token_divergence

__all__ = ["chunked_lm_loss", "lm_loss", "LMLoss", "choose_path", "loss_chunk_rows", "LOSS_CHUNK_FLOATS",
           "LOSS_PATHS", "shifted"]

LOSS_CHUNK_FLOATS = 1 << 24  # ~64 MiB of float32 logits per chunk per model, whatever the vocabulary
LOSS_PATHS = ("auto", "fused", "materialized", "chunked", "checkpointed")
FUSED_CHUNK_FLOATS = 1 << 22  # fused path: ≤ ~16 MiB per (rows, V) float32 temporary; nothing is kept


def loss_chunk_rows(vocab: int) -> int:
    """Positions per loss chunk, sized so one chunk's (rows, V) logits stay near LOSS_CHUNK_FLOATS."""
    return max(16, min(512, LOSS_CHUNK_FLOATS // max(vocab, 1)))


def _fused_chunk_rows(vocab: int) -> int:
    """64–256 rows: measured fastest on CPU (bench_loss_memory.py; fewer rows starve the matmuls, more spill
    the caches), and a handful of (rows, V) float32 temporaries stay ≤ ~16 MiB each up to V = 64k."""
    return max(64, min(256, FUSED_CHUNK_FLOATS // max(vocab, 1)))


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """Half precision is upcast to float32 for the loss (log-softmax over a large vocabulary in bf16
    loses most of the tail); float32 and float64 stay."""
    return torch.promote_types(x.dtype, torch.float32)


def shifted(hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """States at t predict token t+1: returns (N, H) states and (N,) targets where loss_mask[t+1]."""
    select = loss_mask[:, 1:]  # (B, L-1)
    return hidden[:, :-1][select], input_ids[:, 1:][select]


Teacher = TopKSignal | torch.Tensor | tuple[nn.Module, torch.Tensor] | None


def _teacher_rows(teacher: Teacher, rows: slice):
    if teacher is None:
        return None
    if isinstance(teacher, tuple):
        return teacher[1][rows]
    return teacher[rows]


def _teacher_logits(teacher: Teacher, part, shared: int):
    """One chunk's teacher side, ready for :func:`token_divergence`: a TopKSignal, or float logits."""
    if part is None or isinstance(part, TopKSignal):
        return part
    with torch.no_grad():
        logits = teacher[0](part) if isinstance(teacher, tuple) else part
        logits = logits[..., :shared]
        return logits.to(_loss_dtype(logits))


def _kd_ce(logits: torch.Tensor, targets: torch.Tensor, teacher_part, loss_type: str, temperature: float,
           beta: float, need_kd: bool, need_ce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ divergence, Σ CE) of one chunk's (c, V) logits (already cut to the shared vocabulary)."""
    logits = logits.to(_loss_dtype(logits))
    zero = logits.new_zeros(())
    ce = F.cross_entropy(logits, targets, reduction="sum") if need_ce else zero
    kd = token_divergence(logits, teacher_part, loss_type, temperature, beta).sum() \
        if need_kd and teacher_part is not None else zero
    return kd, ce


# --------------------------------------------------------------------------- the (kd, ce) paths

def chunked_lm_loss(student_head: nn.Module, student_hidden: torch.Tensor, targets: torch.Tensor,
                    teacher: Teacher, shared: int, loss_type: str, temperature: float, beta: float,
                    chunk: int | None = None, need_ce: bool = True,
                    path: str = "checkpointed") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (divergence, cross-entropy) over N selected positions, both differentiable.

    Args:
        student_hidden: (N, H) student states at the positions that count (or (N, V) logits)
        targets: (N,) next-token ids
        teacher: see the module docstring (TopKSignal, logits tensor, (head, hidden) or None)
        shared: vocabulary entries both models share (a padded head is cut to this)
        path: "checkpointed" (default here), "chunked" or "materialized"; the fused path, which
            differentiates one weighted total, is :func:`lm_loss`
    Returns:
        two float32 scalars (float64 for float64 inputs): Σ divergence (not T²-scaled), Σ cross-entropy. With N = 0 both
        are exactly 0 and still connected to ``student_hidden``, so backward works.
    """
    if path not in ("checkpointed", "chunked", "materialized"):
        raise ValueError(f"chunked_lm_loss path must be checkpointed, chunked or materialized, not {path!r}")
    # Start from an empty slice's sum: 0, on the graph, so an empty selection can still backward.
    dtype = _loss_dtype(student_hidden)
    kd_total = student_hidden[:0].sum(dtype=dtype)
    ce_total = student_hidden[:0].sum(dtype=dtype)
    n = student_hidden.shape[0]
    if path == "materialized":
        chunk = max(n, 1)
    chunk = chunk or loss_chunk_rows(shared)
    use_checkpoint = path == "checkpointed" and torch.is_grad_enabled() and student_hidden.requires_grad
    # split (one backward node that concatenates the chunks' gradients) rather than slicing
    # (each slice's backward would zero-fill a full-size gradient: N × V when the input is logits).
    chunks = zip(range(0, n, chunk), student_hidden.split(chunk), targets.split(chunk))
    for start, hidden_part, target_part in chunks:
        teacher_part = _teacher_rows(teacher, slice(start, start + chunk))
        # Everything a chunk needs is an argument: checkpoint re-runs the function in backward,
        # after this loop has moved on, so a closure over loop variables would see the last chunk.
        args = (hidden_part, target_part, teacher_part, student_head, teacher, shared, loss_type, temperature, beta,
                need_ce)
        if use_checkpoint:
            kd, ce = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            kd, ce = _chunk_loss(*args)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    return kd_total, ce_total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, teacher_part, student_head: nn.Module, teacher,
                shared: int, loss_type: str, temperature: float, beta: float,
                need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ divergence, Σ CE) of one chunk: hidden (c, H) → logits (c, V) inside, so only c × V is live.
    Under a checkpoint an online teacher's head is re-run in backward (cheaper in memory than
    keeping its (c, V) logits); the fused path never does that."""
    logits = student_head(hidden)[..., :shared]  # (c, V)
    return _kd_ce(logits, targets, _teacher_logits(teacher, teacher_part, shared), loss_type, temperature, beta,
                  True, need_ce)


# --------------------------------------------------------------------------- fused

@dataclass
class LMLoss:
    """kd_weight·kd + ce_weight·ce (differentiable) and its two sums (detached), and the path taken."""
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    path: str


def choose_path(requested: str, student_hidden: torch.Tensor) -> str:
    """The path for ``requested`` ("auto" or one of LOSS_PATHS).

    auto → "fused" whenever a gradient is needed: it keeps the least (chunk × V working memory,
    no (N, V) tensor saved for backward) AND does the least work (no head re-run, the teacher head
    once), so there is no memory budget under which another path wins; measured in
    ``benchmarks/bench_loss_memory.py`` and ``bench_vs_trl.py``. Without gradients (validation,
    evaluation) → "chunked", which then keeps nothing either. The other paths stay selectable:
    they are the references the fused path is tested against.
    """
    if requested not in LOSS_PATHS:
        raise ValueError(f"loss path must be one of {', '.join(LOSS_PATHS)}, not {requested!r}")
    if requested != "auto":
        return requested
    needs_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    return "fused" if needs_grad else "chunked"


def lm_loss(student_head: nn.Module, student_hidden: torch.Tensor, targets: torch.Tensor, teacher: Teacher,
            shared: int, loss_type: str, temperature: float, beta: float, kd_weight: float, ce_weight: float,
            path: str = "auto", chunk: int | None = None) -> LMLoss:
    """``kd_weight · Σ divergence + ce_weight · Σ CE`` over N positions, by ``path`` (see module docstring).

    A weight of 0 skips its term's work entirely (CE-only jobs pass ``teacher=None``)."""
    path = choose_path(path, student_hidden)
    need_kd, need_ce = kd_weight != 0 and teacher is not None, ce_weight != 0
    if path != "fused":
        kd, ce = chunked_lm_loss(student_head, student_hidden, targets, teacher if need_kd else None, shared,
                                 loss_type, temperature, beta, chunk=chunk, need_ce=need_ce, path=path)
        return LMLoss(kd_weight * kd + ce_weight * ce, kd.detach(), ce.detach(), path)
    params = tuple(p for p in student_head.parameters())
    total, kd, ce = _FusedHeadLoss.apply(student_hidden, targets, teacher if need_kd else None, student_head,
                                         shared, loss_type, temperature, beta, float(kd_weight), float(ce_weight),
                                         need_ce, chunk or _fused_chunk_rows(shared), len(params), *params)
    return LMLoss(total, kd, ce, path)


def _linear(head: nn.Module) -> bool:
    """A plain nn.Linear (not a subclass such as a LoRA layer, not hooked): the matmul fast path applies."""
    return type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss AND every gradient, chunk by chunk; backward scales them.

    Inputs after the options are the head's parameters, so autograd routes their gradients (tied
    embeddings accumulate as usual). Only the total is differentiable; kd and ce are reported sums.
    """

    @staticmethod
    def forward(ctx, hidden, targets, teacher, head, shared, loss_type, temperature, beta, kd_weight, ce_weight,
                need_ce, chunk, n_params, *params):
        dtype = _loss_dtype(hidden)
        needs = ctx.needs_input_grad
        want_hidden = needs[0]
        want_params = [needs[13 + i] for i in range(n_params)]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p, dtype=_loss_dtype(p)) if w else None for p, w in zip(params, want_params)]
        kd_total = hidden.new_zeros((), dtype=dtype)
        ce_total = hidden.new_zeros((), dtype=dtype)
        fast = _linear(head)
        weight = head.weight[:shared] if fast else None
        bias = head.bias[:shared] if fast and head.bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            teacher_part = _teacher_logits(teacher, _teacher_rows(teacher, rows), shared)
            if fast and _analytic(loss_type, beta, teacher_part):
                logits = F.linear(h.detach(), weight.detach(), None if bias is None else bias.detach())
                kd, ce, g = _forward_kl_grad(logits, targets[rows], teacher_part, temperature, kd_weight,
                                             ce_weight, need_ce)
                _accumulate(g.to(h.dtype), h, weight, bias, rows, grad_hidden, grad_params, want_hidden,
                            want_params, shared)
            elif fast:
                with torch.enable_grad():
                    logits = F.linear(h.detach(), weight.detach(), None if bias is None else bias.detach())
                    logits = logits.requires_grad_()
                    kd, ce = _kd_ce(logits, targets[rows], teacher_part, loss_type, temperature, beta,
                                    teacher_part is not None, need_ce)
                    total = kd_weight * kd + ce_weight * ce
                    (g,) = torch.autograd.grad(total, logits) if total.requires_grad else (torch.zeros_like(logits),)
                _accumulate(g.to(h.dtype), h, weight, bias, rows, grad_hidden, grad_params, want_hidden,
                            want_params, shared)
            else:
                with torch.enable_grad():
                    leaf = h.detach().requires_grad_(want_hidden)
                    logits = head(leaf)[..., :shared]
                    kd, ce = _kd_ce(logits, targets[rows], teacher_part, loss_type, temperature, beta,
                                    teacher_part is not None, need_ce)
                    total = kd_weight * kd + ce_weight * ce
                    wanted = ([leaf] if want_hidden else []) + [p for p, w in zip(params, want_params) if w]
                    grads = torch.autograd.grad(total, wanted, allow_unused=True) if wanted and total.requires_grad \
                        else [None] * len(wanted)
                grads = list(grads)
                if want_hidden:
                    g = grads.pop(0)
                    if g is not None:
                        grad_hidden[rows] = g
                for i, w in enumerate(want_params):
                    if w:
                        g = grads.pop(0)
                        if g is not None:
                            grad_params[i] += g.to(grad_params[i].dtype)
            kd_total += kd.detach()
            ce_total += ce.detach()
        total = kd_weight * kd_total + ce_weight * ce_total
        ctx.n_params = n_params
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0),
                              *[g if g is not None else hidden.new_empty(0) for g in grad_params])
        ctx.has = [grad_hidden is not None] + [g is not None for g in grad_params]
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        saved = ctx.saved_tensors
        grad_hidden = saved[0] * grad_total.to(saved[0].dtype) if ctx.has[0] else None
        grad_params = [saved[1 + i].mul(grad_total.to(saved[1 + i].dtype)).to(ctx.param_dtypes[i])
                       if ctx.has[1 + i] else None for i in range(ctx.n_params)]
        return (grad_hidden, None, None, None, None, None, None, None, None, None, None, None, None, *grad_params)


def _accumulate(g, h, weight, bias, rows, grad_hidden, grad_params, want_hidden, want_params, shared) -> None:
    """From the gradient of the logits g (c, V) of a Linear head: the hidden states' and the parameters'."""
    if want_hidden:  # no out= (autocast skips out= variants): under bf16 autocast this matmul runs in bf16
        grad_hidden[rows] = (g @ weight.detach().to(g.dtype)).to(grad_hidden.dtype)
    if want_params[0]:  # weight: (V_rows, H); rows past `shared` get no gradient
        grad_params[0][:shared].addmm_(g.t().to(grad_params[0].dtype), h.detach().to(grad_params[0].dtype))
    if bias is not None and want_params[1]:
        grad_params[1][:shared] += g.sum(0).to(grad_params[1].dtype)


def _analytic(loss_type: str, beta: float, teacher_part) -> bool:
    """Forward KL against full teacher logits (or no teacher: CE only) has a closed-form gradient."""
    forward = loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0)
    return teacher_part is None or forward


def _forward_kl_grad(logits: torch.Tensor, targets: torch.Tensor, teacher, temperature: float, kd_weight: float,
                     ce_weight: float, need_ce: bool):
    """(Σ KL(p‖q), Σ CE, d(kd_weight·KL + ce_weight·CE)/d logits) for one chunk, in closed form and a few
    in-place passes over (c, V) — the same quantities autograd gives through token_divergence and
    cross_entropy (tested to float64 rounding), with p clamped at LOG_PROB_FLOOR exactly as there:

        KL = Σ p (log p − log q),   ∂KL/∂s = (q · Σp − p) / T,   ∂CE/∂s = softmax(s) − onehot(target)
    """
    from .token import LOG_PROB_FLOOR

    s = logits.to(_loss_dtype(logits))
    zero = s.new_zeros(())
    log_q = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
    ce, g_ce = zero, None
    if need_ce:  # first: the top-k branch below spends log_q in place
        log_sm = log_q if temperature == 1 else F.log_softmax(s, dim=-1)
        picked = log_sm.gather(-1, targets.unsqueeze(-1))
        ce = -picked.sum()
        if ce_weight:
            g_ce = log_sm.exp().mul_(ce_weight)
            g_ce.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(picked, -ce_weight))
    kd, g = zero, None
    if isinstance(teacher, TopKSignal):
        kd, g = _topk_forward_kl(log_q, teacher, kd_weight / temperature)
    elif teacher is not None:
        t = teacher if temperature == 1 else teacher / temperature
        log_p = F.log_softmax(t, dim=-1).clamp_min_(LOG_PROB_FLOOR)
        p = log_p.exp()
        kd = torch.dot(p.reshape(-1), log_p.sub_(log_q).reshape(-1))  # log_p is spent from here on
        scale = kd_weight / temperature
        g = log_q.exp_().mul_(p.sum(-1, keepdim=True) * scale).sub_(p, alpha=scale) if kd_weight else None
    if g is None or not kd_weight:
        g = g_ce
    elif g_ce is not None:
        g.add_(g_ce)
    if g is None:
        g = torch.zeros_like(s)
    return kd, ce, g


def _topk_forward_kl(log_q: torch.Tensor, teacher: TopKSignal, scale: float):
    """Σ forward KL on the k + 1 buckets of a top-k signal (token.py's module docstring) and ``scale`` × its
    gradient with respect to the student's tempered logits u = s / T, where q = softmax(u):

        KL = Σ_i p_i (log p_i − log q_{id_i}) + p_tail (log p_tail − log q_tail),  q_tail = Σ_{m ∉ top} q_m
        ∂KL/∂u_m = q_m (Σ_i p_i + p_tail·[q_tail ≥ ε]) − p_m·[m ∈ top] − [q_tail ≥ ε]·p_tail q_m [m ∉ top] / q_tail

    (q_tail is clamped at TAIL_EPS as in token.py, where its gradient is then 0.) q_tail is summed directly
    over the tail entries, as token.py does (accurate for a small tail), by zeroing the top-k entries of q
    in place: no (c, V) copy."""
    import math

    from .token import LOG_PROB_FLOOR, TAIL_EPS

    idx = teacher.indices.long()
    log_p_top = teacher.logprobs.to(log_q.dtype).clamp_min(LOG_PROB_FLOOR)
    p_top = log_p_top.exp()
    if teacher.tail_logprob is not None:
        log_p_tail = teacher.tail_logprob.to(log_q.dtype).unsqueeze(-1).clamp_min(math.log(TAIL_EPS))
    else:
        log_p_tail = (1.0 - p_top.sum(-1, keepdim=True)).clamp_min(TAIL_EPS).log()
    p_tail = log_p_tail.exp()
    log_q_top = log_q.gather(-1, idx)
    q_top = log_q_top.exp()
    q = log_q.exp_().scatter_(-1, idx, 0.0)  # log_q is spent: q outside the top-k, 0 on it
    q_tail_raw = q.sum(-1, keepdim=True)
    open_tail = (q_tail_raw >= TAIL_EPS).to(log_q.dtype)  # clamp_min passes the gradient at equality too
    q_tail = q_tail_raw.clamp_min(TAIL_EPS)
    kd = (p_top * (log_p_top - log_q_top)).sum() + (p_tail * (log_p_tail - q_tail.log())).sum()
    tail_factor = open_tail * p_tail / q_tail  # (c, 1)
    coef = p_top.sum(-1, keepdim=True) + p_tail * open_tail
    g = q.mul_((coef - tail_factor) * scale)  # the tail entries
    g.scatter_(-1, idx, (q_top * coef - p_top) * scale)  # the top-k entries
    return kd, g
