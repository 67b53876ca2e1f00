"""Intermediate-layer losses: hidden states (DistilBERT's cosine, TinyBERT's MSE) and the
last layer's attention distributions (MiniLM's KL), plus the student ↔ teacher layer map.

Every loss here returns one value per *position that counts* — shape (N,), N = the True
entries of the (B, L) mask — so a recipe takes the batch mean for training and sums over
batches (÷ positions) for validation. Values are computed in float32 at least (bf16 inputs
under autocast are upcast). Layer indices are 0-based *block* indices: block j's output is
``hidden_states[j + 1]`` of a transformers forward with ``output_hidden_states=True``
(entry 0 is the embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MismatchError

__all__ = ["uniform_layer_pairs", "resolve_layer_pairs", "hidden_cosine", "hidden_mse", "HIDDEN_LOSSES",
           "attention_kl", "masked_mean"]


def uniform_layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block j ↔ teacher block round((j + 1) · Lt / Ls) − 1 for every student block, so the
    last blocks pair and the rest spread evenly. Halves round up (as in ``evenly_spaced_layers``),
    and a student deeper than twice the teacher maps its first blocks to teacher block 0.
    E.g. Ls=2, Lt=4 → [(0, 1), (1, 3)]; Ls=3, Lt=12 → [(0, 3), (1, 7), (2, 11)]."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError("both models need at least one layer")
    # floor(x + 1/2) with x = (j+1)·Lt/Ls, in integers: no float rounding at exact halves
    return [(j, max((2 * (j + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1, 0))
            for j in range(student_layers)]


def resolve_layer_pairs(layers, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``"uniform"`` or explicit ``[[student, teacher], ...]`` → checked (student, teacher) pairs.
    An index past a model's depth is a MismatchError naming the entry (``intermediate.layers[i][0]``
    for the student's, ``[i][1]`` for the teacher's)."""
    if layers == "uniform":
        return uniform_layer_pairs(student_layers, teacher_layers)
    pairs = []
    for i, (student_layer, teacher_layer) in enumerate(layers):
        for position, who, layer, depth in ((0, "student", student_layer, student_layers),
                                            (1, "teacher", teacher_layer, teacher_layers)):
            if not 0 <= layer < depth:
                raise MismatchError(f"intermediate.layers[{i}] pairs {who} layer {layer} but the {who} has {depth} "
                                    f"layers (0..{depth - 1})", param=f"intermediate.layers[{i}][{position}]")
        pairs.append((student_layer, teacher_layer))
    return pairs


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision → float32 (bf16 hidden states under autocast); float32 and float64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _selected(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H) pair → float32 (N, H) rows where mask (B, L) is True."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)} (project the student's first)")
    select = mask.bool()
    return _upcast(student[select]), _upcast(teacher[select].detach())


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine embedding loss: 1 − cos(student, teacher) per position.

    Args:
        student: (B, L, H) student hidden states (already projected to the teacher's width)
        teacher: (B, L, H) teacher hidden states (no gradient flows into them)
        mask: (B, L) bool/int, the positions that count
    Returns:
        (N,) float32 (float64 for float64 input), in [0, 2]
    """
    student, teacher = _selected(student, teacher, mask)
    return 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT's hidden-state MSE: mean over the hidden dims of (student − teacher)² per position.
    Shapes as :func:`hidden_cosine`; returns (N,) float32."""
    student, teacher = _selected(student, teacher, mask)
    return (student - teacher).pow(2).mean(-1)


HIDDEN_LOSSES = {"cosine": hidden_cosine, "mse": hidden_mse}


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """log p where p > 0, else 0 (never -inf: a masked-out -inf would turn the gradient into NaN)."""
    return torch.log(torch.where(p > 0, p, torch.ones_like(p)))


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's attention transfer: KL(teacher ‖ student) between attention distributions, per
    query position, averaged over heads.

    Args:
        student: (B, h, L, L) student attention probabilities of one layer (query × key)
        teacher: (B, h, L, L) teacher's, same head count
        mask: (B, L) the positions that count, as queries; as keys, masked (padding) keys are
            left out of the sum
    Returns:
        (N,) float32: Σ_keys t · (log t − log s), mean over heads, at the N query positions

    Entries where the teacher's probability is 0 (a causal mask's future keys) add 0. An
    entry where the student's is exactly 0 while training — attention dropout zeroed it — is
    left out too: its log is −∞ and it carries no gradient, so the rest of the row is the
    sample's estimate.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    student, teacher = _upcast(student), _upcast(teacher.detach())
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    counted = keys & (teacher > 0) & (student > 0)
    terms = torch.where(counted, teacher * (_safe_log(teacher) - _safe_log(student)), torch.zeros_like(student))
    per_query = terms.sum(-1).mean(1)  # (B, L): Σ keys, mean over heads
    return per_query[mask.bool()]


def masked_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of (N,) values; 0 (on the graph) when N = 0, so an all-masked batch still backwards."""
    return values.sum() / max(values.shape[0], 1)
