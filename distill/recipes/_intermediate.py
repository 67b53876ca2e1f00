"""Intermediate-layer distillation for the transformers recipes (``spec.intermediate``):
hidden-state matching between paired blocks (cosine or MSE) and, optionally, MiniLM's KL
between the last layer's attention distributions. The losses are in
:mod:`distill.losses.intermediate`; this module is the model side.

    prepare:  eager attention if asked (sdpa returns no probabilities) → one probe forward of
              each model → depths, widths, head counts → layer pairs (checked) → a learned
              nn.Linear(student width, teacher width) per pair whose widths differ
    train:    one forward per model with ``output_hidden_states`` (and ``output_attentions``);
              its last output feeds the output-level loss, so no body runs twice
              total = output-level loss + weight · (hidden-state term [+ attention KL])
    validate: the same terms over the validation set (validation_intermediate_loss,
              validation_attention_kl)
    export:   the student alone — the projections train and checkpoint with it (so a resume
              is exact) but are not part of the model users download

Positions that count are every non-padding token (the attention mask), for causal LMs too:
the teacher's representation of a prompt carries as much as that of a completion, and it is
DistilBERT's choice. Each term is a mean over those positions (and over the layer pairs), so
``weight`` means the same whatever the depth or the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MismatchError
from ..losses.intermediate import HIDDEN_LOSSES, attention_kl, masked_mean, resolve_layer_pairs

__all__ = ["Features", "forward_features", "Intermediate", "WithIntermediate"]


@dataclass
class Features:
    output: torch.Tensor
    """What the recipe's output-level loss uses: the last hidden state (B, L, H) or the logits."""
    hidden: tuple[torch.Tensor, ...]
    """``hidden_states``: the embeddings, then block 0, ..., block L−1 (each (B, L, H))."""
    attention: torch.Tensor | None
    """The last layer's attention probabilities (B, heads, L, L), when asked for."""


def forward_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, base: bool,
                     attention: bool) -> Features:
    """One forward with hidden states (and attentions). ``base``: run ``model.base_model`` and
    return its last hidden state as ``output`` (a causal LM split into body and head); else the
    whole model, whose ``output`` is its logits."""
    runner = model.base_model if base else model
    out = runner(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=attention)
    output = out.last_hidden_state if base else out.logits
    attentions = getattr(out, "attentions", None) if attention else None
    return Features(output=output, hidden=tuple(out.hidden_states),
                    attention=attentions[-1] if attentions else None)


def _use_eager_attention(model: nn.Module, who: str) -> str | None:
    """Switch to eager attention (the only one that returns probabilities); returns the previous
    implementation to restore after training."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == "eager":
        return None
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds for unsupported models
        raise MismatchError(f"the {who} can't switch to eager attention, which intermediate.attention needs to see "
                            f"attention probabilities: {exc}", param="intermediate.attention") from None
    return previous


class Projections(nn.Module):
    """The learned maps from student to teacher width, one per layer pair that needs one
    (``projections[str(pair index)]``). Trained and checkpointed with the student, not exported."""

    def __init__(self, widths: list[tuple[int, int]]):
        super().__init__()
        self.projections = nn.ModuleDict({str(i): nn.Linear(student, teacher)
                                          for i, (student, teacher) in enumerate(widths) if student != teacher})

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        key = str(index)
        return self.projections[key](hidden) if key in self.projections else hidden


class Intermediate:
    """The recipe's handle on the intermediate term: the layer pairs, the projections
    (``self.module``, an nn.Module the loop trains and checkpoints) and the forwards."""

    def __init__(self, spec, student: nn.Module, teacher: nn.Module, probe_ids: torch.Tensor,
                 probe_mask: torch.Tensor, student_base: bool, teacher_base: bool, device: torch.device):
        self.spec, self.student, self.teacher = spec, student, teacher
        self.student_base, self.teacher_base = student_base, teacher_base
        self.attention = spec.attention
        self.restore: list[tuple[nn.Module, str]] = []
        if self.attention:
            for model, who in ((student, "student"), (teacher, "teacher")):
                previous = _use_eager_attention(model, who)
                if previous is not None:
                    self.restore.append((model, previous))
        student_probe = self._probe(student, probe_ids, probe_mask, student_base)
        teacher_probe = self._probe(teacher, probe_ids, probe_mask, teacher_base)
        self.student_layers, self.teacher_layers = len(student_probe.hidden) - 1, len(teacher_probe.hidden) - 1
        self.pairs = resolve_layer_pairs(spec.layers, self.student_layers, self.teacher_layers)
        widths = [(student_probe.hidden[s + 1].shape[-1], teacher_probe.hidden[t + 1].shape[-1])
                  for s, t in self.pairs]
        self.heads = None
        if self.attention:
            for probe, who in ((student_probe, "student"), (teacher_probe, "teacher")):
                if probe.attention is None:
                    raise MismatchError(f"the {who} returns no attention probabilities (its family doesn't support "
                                        "output_attentions); leave intermediate.attention off",
                                        param="intermediate.attention")
            student_heads, teacher_heads = student_probe.attention.shape[1], teacher_probe.attention.shape[1]
            if student_heads != teacher_heads:
                raise MismatchError(f"intermediate.attention compares the last layers' attention head by head, but the "
                                    f"student's has {student_heads} heads and the teacher's {teacher_heads}; give the "
                                    "student the teacher's head count or leave attention off",
                                    param="intermediate.attention")
            self.heads = student_heads
        self.module = Projections(widths).to(device)
        self.widths = widths
        self.hidden_loss = HIDDEN_LOSSES[spec.type]

    def _probe(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, base: bool) -> Features:
        was_training = model.training
        model.eval()  # no dropout: the probe draws nothing from the run's RNG
        try:
            with torch.no_grad():
                return forward_features(model, ids, mask, base, self.attention)
        finally:
            model.train(was_training)

    def student_features(self, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        return forward_features(self.student, ids, mask, self.student_base, self.attention)

    def teacher_features(self, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        with torch.no_grad():
            return forward_features(self.teacher, ids, mask, self.teacher_base, self.attention)

    def terms(self, student: Features, teacher: Features, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per position that counts, (N,) each: the hidden-state loss averaged over the layer pairs,
        and the attention KL (None without attention)."""
        per_pair = [self.hidden_loss(self.module(i, student.hidden[s + 1]), teacher.hidden[t + 1], mask)
                    for i, (s, t) in enumerate(self.pairs)]
        hidden = torch.stack(per_pair).mean(0)
        kl = attention_kl(student.attention, teacher.attention, mask) if self.attention else None
        return hidden, kl

    def loss(self, student: Features, teacher: Features, mask: torch.Tensor) -> torch.Tensor:
        """weight · (mean hidden-state term [+ mean attention KL]) over the batch's positions."""
        hidden, kl = self.terms(student, teacher, mask)
        total = masked_mean(hidden) + (masked_mean(kl) if kl is not None else 0)
        return self.spec.weight * total

    @torch.no_grad()
    def validate(self, tokens: dict, device: torch.device, batch_size: int) -> dict:
        """The terms over a token set, per position: ``validation_intermediate_loss`` (hidden
        states) and, with attention, ``validation_attention_kl``. One host sync at the end."""
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        positions = 0
        for start in range(0, tokens["input_ids"].shape[0], batch_size):
            ids = tokens["input_ids"][start:start + batch_size].to(device)
            mask = tokens["attention_mask"][start:start + batch_size].to(device)
            hidden, kl = self.terms(self.student_features(ids, mask), self.teacher_features(ids, mask), mask)
            sums[0] += hidden.sum()
            if kl is not None:
                sums[1] += kl.sum()
            positions += int(tokens["attention_mask"][start:start + batch_size].sum())
        hidden_mean, kl_mean = (sums / max(positions, 1)).tolist()
        result = {"validation_intermediate_loss": hidden_mean}
        if self.attention:
            result["validation_attention_kl"] = kl_mean
        return result

    def weighted(self, validation: dict) -> float:
        """weight · the terms of a :meth:`validate` result (what they add to the validation loss)."""
        return self.spec.weight * (validation["validation_intermediate_loss"]
                                   + validation.get("validation_attention_kl", 0.0))

    def describe(self) -> dict:
        """For the evaluation report: what was matched, and whether projections were learned."""
        return {"type": self.spec.type, "weight": self.spec.weight,
                "layers": self.spec.layers if isinstance(self.spec.layers, str) else "explicit",
                "pairs": [list(pair) for pair in self.pairs],
                "projections": len(self.module.projections) > 0,
                "projected_pairs": [list(self.pairs[int(i)]) for i in self.module.projections],
                "student_layers": self.student_layers, "teacher_layers": self.teacher_layers,
                "attention": self.attention, "attention_heads": self.heads}

    def restore_attention(self) -> None:
        """Back to the attention implementation the models had (sdpa is faster for evaluation and
        serving); the exported config never records the switch either way."""
        for model, previous in self.restore:
            model.set_attn_implementation(previous)
        self.restore = []


class WithIntermediate:
    """Mixin for recipes that accept ``spec.intermediate``: ``self.intermediate`` (None when off)
    and the modules the loop trains — the student alone, or the student and the projections."""

    intermediate: Intermediate | None = None

    def setup_intermediate(self, tokens: dict, student_base: bool, teacher_base: bool) -> None:
        spec = self.spec.intermediate
        if spec is None:
            return
        probe_ids = tokens["input_ids"][:2].to(self.device)
        probe_mask = tokens["attention_mask"][:2].to(self.device)
        self.intermediate = Intermediate(spec, self.model, self.teacher_model, probe_ids, probe_mask, student_base,
                                         teacher_base, self.device)
        self._trained = nn.ModuleDict({"student": self.model, "intermediate": self.intermediate.module})

    def trained_modules(self) -> nn.Module:
        return self.model if self.intermediate is None else self._trained
