"""Several teachers (``"teachers": [{..., "weight": w}, ...]``): the soft target is the weighted
mixture of the teachers' probabilities at temperature T,

    p(y) = Σ_i w_i · softmax(z_i / T)(y)          (weights normalised to sum to 1)

It is handed to the unchanged losses as one set of "mixture logits",

    m = T · log Σ_i w_i · softmax(z_i / T)        so that softmax(m / T) = p exactly,

so every divergence, the top-k signal and the chunked LM loss work on a mixture as they do on
one teacher. With one teacher the logits pass through untouched (bit for bit).

Each teacher's signal is computed once: classifiers keep (N, C) logits per teacher; causal LMs
run all teachers on the batch (or once, into the top-k signal) and mix chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mixture_logits", "MixtureClassifier", "MixtureLM", "teacher_reports"]


def mixture_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """``T · log Σ_i w_i softmax(z_i / T)`` over the last dim; one teacher: its logits, unchanged."""
    if len(logits) == 1:
        return logits[0]
    parts = [F.log_softmax(z.float() / temperature, dim=-1) + math.log(w) for z, w in zip(logits, weights)]
    return temperature * torch.logsumexp(torch.stack(parts), dim=0)


class MixtureClassifier(nn.Module):
    """Several classifiers as one model whose output is their mixture logits: what the evaluation
    times and counts as "the teacher" (its parameters are the sum of the teachers')."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float], temperature: float):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.weights, self.temperature = list(weights), temperature

    def forward(self, *args, **kwargs) -> torch.Tensor:
        outputs = [teacher(*args, **kwargs) for teacher in self.teachers]
        outputs = [getattr(o, "logits", o) for o in outputs]
        return mixture_logits(outputs, self.weights, self.temperature)


class MixtureLM:
    """Causal-LM teachers that share one tokenizer, behind the body/head split of
    :class:`~distill.recipes._text.LogitsHead`: ``body`` concatenates every teacher's last
    hidden states (B, L, H1 + H2 + ...); ``head`` splits them again, applies each teacher's
    head, cuts to the shared vocabulary and mixes. The chunked loss applies ``head`` chunk by
    chunk, so the mixture never holds more than a chunk of logits per teacher."""

    def __init__(self, teachers: Sequence, weights: Sequence[float], temperature: float, shared: int):
        self.teachers, self.weights = list(teachers), list(weights)
        self.temperature, self.shared = temperature, shared
        self.widths: list[int] | None = None
        self.split = all(t.split for t in self.teachers)

    def body(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = [teacher.body(ids, mask) for teacher in self.teachers]
        self.widths = [s.shape[-1] for s in states]
        return torch.cat(states, dim=-1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.widths is None:
            raise RuntimeError("MixtureLM.head before body")
        parts = hidden.split(self.widths, dim=-1)
        logits = [t.head(part)[..., :self.shared].float() for t, part in zip(self.teachers, parts)]
        return mixture_logits(logits, self.weights, self.temperature)


def teacher_reports(spec, teachers: Sequence[nn.Module], teacher_logits: Sequence[torch.Tensor],
                    student_logits: torch.Tensor, labels: torch.Tensor | None) -> list[dict]:
    """Every teacher beside the student, for a classifier's evaluation: name, weight, parameters,
    accuracy (with labels) and the student's agreement with that teacher."""
    from ..models import count_parameters

    names = spec.input_names()
    reports = []
    for i, (teacher, logits, (_, weight)) in enumerate(zip(teachers, teacher_logits, spec.teacher_paths)):
        predictions = logits.argmax(-1)
        reports.append({
            "name": names.get(f"teachers[{i}]", names["teacher"]), "weight": weight,
            "parameters": count_parameters(teacher),
            "accuracy": (predictions == labels.to(predictions.device)).float().mean().item()
            if labels is not None else None,
            "student_agreement": (student_logits.argmax(-1) == predictions).float().mean().item(),
        })
    return reports
