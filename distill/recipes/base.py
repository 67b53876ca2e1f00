"""What the training loop is handed: a :class:`Recipe` (one task's data, teacher signal,
batch loss, evaluation and export) and a :class:`RunContext` (device, events, stops)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import JobStopped

if TYPE_CHECKING:
    from ..spec import JobSpec
    from ..teacher_cache import TeacherCache

__all__ = ["Recipe", "RunContext", "Export", "register", "RECIPES", "LOSS_RECIPES"]

EventCallback = Callable[[str, dict], None]
RECIPES: dict[tuple[str, str], type["Recipe"]] = {}
LOSS_RECIPES: dict[tuple[str, str, str], type["Recipe"]] = {}


def register(task: str, method: str = "token", loss: str | None = None):
    """Class decorator: this recipe runs jobs of ``task`` with ``method`` (and, when given,
    only those whose ``loss.type`` is ``loss``: a loss that needs its own data path)."""

    def add(cls: type[Recipe]) -> type[Recipe]:
        table, key = (RECIPES, (task, method)) if loss is None else (LOSS_RECIPES, (task, method, loss))
        if key in table:
            raise ValueError(f"two recipes for {key}")
        cls.task, cls.method = task, method
        table[key] = cls
        return cls

    return add


@dataclass
class RunContext:
    """The run's surroundings, handed to the recipe and the loop."""

    device: torch.device
    out_dir: Path
    on_event: EventCallback
    should_stop: Callable[[], bool]
    resume: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)
    """The engine's own randomness (data order, splits); global RNG is only what torch modules use."""
    teacher_cache: "TeacherCache | None" = None
    """Top-k teacher signals shared across jobs (distill/teacher_cache.py); None: computed every run."""

    def stage(self, stage: str, **data) -> None:
        self.on_event("stage", {"stage": stage, **data})

    def check_stop(self, where: str) -> None:
        """Loading, teacher inference, generation and evaluation call this between chunks of work."""
        if self.should_stop():
            raise JobStopped(f"stopped while {where}")


@dataclass
class Export:
    model_path: Path
    """A model file (format 'safetensors') or a transformers directory (format 'hf')."""
    kind: str
    """The model kind (distill.kinds): 'mlp' | 'hf'."""
    architecture: dict
    parameters: int
    generated_path: Path | None = None
    """Sequence-level KD: the teacher-generated training set (JSONL)."""
    adapter_path: Path | None = None
    """A LoRA student: the PEFT adapter folder (model_path holds the merged model)."""

    @property
    def format(self) -> str:
        return "hf" if self.kind == "hf" else "safetensors"


class Recipe:
    """One task. The loop calls, in order: ``prepare()``, then per optimizer step
    ``batch_loss(indices)`` for each batch, ``validate()`` after each epoch, and at the end
    ``evaluate()`` and ``export(folder, evaluation, history)``.

    Subclasses set ``self.model`` (the student) and ``self.num_examples`` (rows the loop
    shuffles and batches) in prepare. The loop optimizes, switches train/eval and checkpoints
    :meth:`trained_modules` — the student, unless the recipe trains more beside it.
    """

    task: str
    method: str
    model: nn.Module
    num_examples: int
    position: tuple[int, int] = (0, 0)
    """(epoch, batch) of the batch being computed: the loop sets it before every ``batch_loss``
    (after a resume too), for recipes whose choices depend on where they are (on-policy batches)."""

    def __init__(self, spec: "JobSpec", ctx: RunContext):
        self.spec, self.ctx, self.hp = spec, ctx, spec.hyperparameters
        self.device = ctx.device

    def prepare(self) -> None:
        """Load teacher, student and data; compute the teacher signal."""
        raise NotImplementedError

    def trained_modules(self) -> nn.Module:
        """Everything that trains: the optimizer's parameters, train()/eval() and the step
        checkpoint. The student alone by default (its checkpoint keys are the student's own); a
        recipe that learns helpers beside it (e.g. intermediate-layer projections) returns an
        ``nn.ModuleDict`` holding both. Only ``self.model`` is exported."""
        return self.model

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's targets, number of targets). A count of 0 means the
        batch has nothing to learn from (e.g. no target tokens): the loop skips it.
        The count must be known without a device sync (computed from CPU tensors)."""
        raise NotImplementedError

    def validate(self) -> dict:
        """Per-epoch validation: ``{"validation_loss": ..., **metrics}`` (called under no_grad, model in eval)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """The final teacher-vs-student report."""
        raise NotImplementedError

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        raise NotImplementedError


class Throttle:
    """True at most once per ``every_s`` seconds."""

    def __init__(self, every_s: float):
        self.every_s, self.last = every_s, time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        return False
