"""The distillation loop, top to bottom:

    load teacher + data → teacher inference once (the soft targets) → train the
    student for N epochs on the stored targets → evaluate on validation → export.

The engine reports through two injected callables and imports no service code:
``on_event(kind, data)`` receives stage changes, step progress and per-epoch metrics;
``should_stop()`` is polled after every step (the caller throttles it) and a True
stops the run with JobStopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TabularDataset, load_dataset, split_dataset
from .device import resolve_device
from .errors import DataError, JobStopped, MismatchError, ModelFormatError
from .evaluate import classification_metrics, evaluate
from .losses import distillation_loss
from .models import MLP, MLPArchitecture, load_model, save_model
from .spec import TEXT_TASKS, Hyperparameters, JobSpec
from .teacher_signal import compute_logits

__all__ = ["run_distillation", "RunResult", "EventCallback"]

EventCallback = Callable[[str, dict], None]
FINAL_DIR = "final"
PROGRESS_EVERY_S = 0.5  # step-level progress events are throttled to this


@dataclass
class RunResult:
    model_path: Path
    """The student: a model file (MLP) or a Hugging Face directory (text tasks)."""
    architecture: dict
    parameters: int
    evaluation: dict
    history: list[dict]  # one entry per epoch
    device: str
    format: str = "safetensors"
    """'safetensors' (one model file) or 'hf' (a transformers directory)."""
    generated_path: Path | None = None
    """Sequence-level KD: the teacher-generated training set (JSONL)."""


def _ignore_event(kind: str, data: dict) -> None:
    pass


def _never_stop() -> bool:
    return False


def get_lr(hp: Hyperparameters, step: int, total_steps: int) -> float:
    """Cosine from learning_rate down to 10% of it over the run, or constant."""
    if hp.lr_scheduler == "constant" or total_steps <= 1:
        return hp.learning_rate
    progress = step / (total_steps - 1)
    return hp.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _load(path: Path, param: str) -> TabularDataset:
    try:
        return load_dataset(path)
    except DataError as exc:
        raise DataError(f"{param}: {exc.message}", param=param, line=exc.line) from None


def epoch_order(hp: Hyperparameters, n: int, epoch: int) -> torch.Tensor:
    """A permutation seeded by (seed, epoch): the same batches on every run and every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((hp.seed * 1_000_003 + epoch) % 2**63))


def load_data(spec: JobSpec) -> tuple[TabularDataset, TabularDataset]:
    training = _load(spec.training_file, "training_file")
    if spec.validation_file is not None:
        return training, _load(spec.validation_file, "validation_file")
    return split_dataset(training, spec.validation_split, spec.hyperparameters.seed)


def load_teacher(path: Path, device: torch.device) -> MLP:
    try:
        return load_model(path, device)
    except ModelFormatError as exc:
        raise ModelFormatError(f"teacher: {exc.message}", param="teacher", tensor=exc.tensor) from None


def check_compatible(teacher: MLPArchitecture, training: TabularDataset, validation: TabularDataset) -> None:
    """Teacher and data must agree on feature count and label range; say which file doesn't."""
    for name, dataset in (("training_file", training), ("validation_file", validation)):
        if dataset.num_features != teacher.input_dim:
            raise MismatchError(
                f"{name} has {dataset.num_features} features per row but the teacher takes {teacher.input_dim}",
                param=name,
            )
        if dataset.labels is not None and int(dataset.labels.max()) >= teacher.num_classes:
            raise MismatchError(
                f"{name} has label {int(dataset.labels.max())} but the teacher has {teacher.num_classes} classes "
                f"(labels 0..{teacher.num_classes - 1})",
                param=name,
            )


@torch.no_grad()
def validation_metrics(student: MLP, val_x: torch.Tensor, val_teacher_logits: torch.Tensor,
                       val_labels: torch.Tensor | None, spec: JobSpec) -> dict:
    hp = spec.hyperparameters
    student.eval()
    student_logits = compute_logits(student, val_x, val_x.device)
    student.train()
    loss = distillation_loss(student_logits, val_teacher_logits, val_labels, hp.temperature, hp.alpha,
                             spec.loss.type, spec.loss.beta)
    metrics = classification_metrics(student_logits, val_teacher_logits, val_labels)
    return {"validation_loss": loss.item(), "validation_agreement": metrics["agreement"],
            "validation_accuracy": metrics["student_accuracy"]}


def run_distillation(
    spec: JobSpec,
    out_dir: str | Path,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "auto",
    resume: bool = False,
    checkpoint_interval_s: float = 60.0,
) -> RunResult:
    """Run one distillation job; artifacts go under ``out_dir`` (checkpoints/, final/).

    Text tasks (causal_lm, text_classification) run in :mod:`distill.text_train`.

    With ``resume`` the newest checkpoint in ``out_dir`` (if any) is restored and
    training continues after its epoch; shuffling is seeded per epoch, so a resumed
    run sees the same batches an uninterrupted one would.
    """
    if spec.task in TEXT_TASKS:
        from .text_train import run_text_distillation  # transformers is imported only for text jobs

        return RunResult(format="hf", **run_text_distillation(spec, out_dir, on_event, should_stop, device))
    on_event = on_event or _ignore_event
    should_stop = should_stop or _never_stop
    out_dir = Path(out_dir)
    hp = spec.hyperparameters
    torch_device = resolve_device(device)
    torch.manual_seed(hp.seed)

    on_event("stage", {"stage": "loading", "device": str(torch_device)})
    teacher = load_teacher(spec.teacher, torch_device)
    training, validation = load_data(spec)
    check_compatible(teacher.architecture, training, validation)
    student_arch = MLPArchitecture(
        input_dim=teacher.architecture.input_dim,
        hidden_dims=spec.student.hidden_dims,
        num_classes=teacher.architecture.num_classes,
        activation=spec.student.activation,
    )
    student = MLP(student_arch).to(torch_device)

    # Teacher inference, once: (N, C) soft-target logits reused by every epoch.
    on_event("stage", {"stage": "teacher_inference", "rows": len(training) + len(validation)})
    train_x = training.features.to(torch_device)  # (N, D)
    train_y = training.labels.to(torch_device) if training.labels is not None else None
    val_x = validation.features.to(torch_device)
    val_y = validation.labels.to(torch_device) if validation.labels is not None else None
    teacher_logits = compute_logits(teacher, train_x, torch_device)  # (N, C)
    val_teacher_logits = compute_logits(teacher, val_x, torch_device)

    optimizer = torch.optim.AdamW(student.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    n = len(training)
    steps_per_epoch = math.ceil(n / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    start_epoch, step, history = 0, 0, []
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, torch_device)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        on_event("stage", {"stage": "resumed", "epoch": start_epoch, "step": step})

    on_event("stage", {"stage": "training", "epochs": hp.epochs, "total_steps": total_steps})
    student.train()
    last_progress = last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, hp.epochs):
        # Seeded per epoch so resume reproduces the order; shuffle on the data's device.
        order = epoch_order(hp, n, epoch).to(torch_device)
        loss_sum = torch.zeros((), device=torch_device)  # summed on-device: no sync per step
        for start in range(0, n, hp.batch_size):
            idx = order[start : start + hp.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = get_lr(hp, step, total_steps)
            student_logits = student(train_x[idx])  # (B, C)
            loss = distillation_loss(student_logits, teacher_logits[idx],
                                     train_y[idx] if train_y is not None else None, hp.temperature, hp.alpha,
                                     spec.loss.type, spec.loss.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            step += 1
            if should_stop():
                raise JobStopped(f"stopped at epoch {epoch + 1}, step {step} of {total_steps}")
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                on_event("progress", {"epoch": epoch + 1, "step": step, "total_steps": total_steps})
                last_progress = now
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / n,
                  "learning_rate": get_lr(hp, step - 1, total_steps),
                  **validation_metrics(student, val_x, val_teacher_logits, val_y, spec)}
        history.append(record)
        on_event("progress", {"epoch": epoch + 1, "step": step, "total_steps": total_steps})
        on_event("epoch", record)
        if time.monotonic() - last_checkpoint >= checkpoint_interval_s and epoch + 1 < hp.epochs:
            save_checkpoint(out_dir, student, optimizer,
                            {"epoch": epoch + 1, "step": step, "history": history, "spec": spec.to_dict()})
            last_checkpoint = time.monotonic()

    on_event("stage", {"stage": "evaluating"})
    student.eval()
    report = evaluate(teacher, student, val_x, val_y, torch_device, teacher_logits=val_teacher_logits)
    on_event("evaluation", report)

    on_event("stage", {"stage": "exporting"})
    final = out_dir / FINAL_DIR
    model_path = save_model(student, final / "model.safetensors")
    (final / "state.json").write_text(json.dumps(
        {"epoch": hp.epochs, "step": step, "history": history, "evaluation": report, "spec": spec.to_dict()}, indent=2))
    return RunResult(model_path=model_path, architecture=student_arch.to_dict(),
                     parameters=student_arch.num_parameters, evaluation=report, history=history,
                     device=str(torch_device))
