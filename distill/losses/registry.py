"""The loss registry: one place that maps a name to a divergence.

A divergence is a plain function ``(log_p, log_q, beta) -> (...,)`` on log-probabilities
over the last dim — p the teacher, q the student, both already at temperature T and
both finite (floored) — returning the per-position divergence, not yet T²-scaled.
Every caller (the MLP and text-classification soft-target loss, the token-level LM loss,
its chunked and top-k forms, the benchmarks, the API's validation and its OpenAPI enum)
reads :data:`LOSS_TYPES` and :func:`get_divergence` from here.

Adding a loss is one function and one ``@register`` line.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["Divergence", "register", "get_divergence", "LOSS_TYPES", "DIVERGENCES"]

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}


def register(name: str) -> Callable[[Divergence], Divergence]:
    def add(function: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"loss {name!r} is registered twice")
        DIVERGENCES[name] = function
        return function

    return add


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"loss_type must be one of {tuple(DIVERGENCES)}, got {name!r}") from None


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a (log a − log b) over the last dim. Both finite, so an underflowed
    a = exp(log a) = 0 contributes 0 · finite = 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


@register("forward_kl")
def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(p‖q): mass-covering, the classic KD loss (Hinton et al. 2015)."""
    return kl(log_p, log_q)


@register("reverse_kl")
def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(q‖p): mode-seeking (MiniLLM; the on-policy distillation recipe)."""
    return kl(log_q, log_p)


@register("jsd")
def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """TRL's generalized JSD (GKD, Agarwal et al. 2024): m = β p + (1 − β) q,
    β KL(p‖m) + (1 − β) KL(q‖m); β = 0 is forward KL and β = 1 reverse KL, as TRL does."""
    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    # log m as a two-term logsumexp, without stacking a (2, N, V) copy.
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


@register("tvd")
def total_variation(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """½ Σ |p − q|: bounded by 1, so one confidently wrong position can't dominate (Wen et al. 2023)."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


LOSS_TYPES: tuple[str, ...] = tuple(DIVERGENCES)
