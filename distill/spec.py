"""The job spec as the engine sees it: dataclasses checked in ``__post_init__``.

The JSON is the same body the HTTP API takes (``POST /v1/distillation/jobs``), except
that files are local paths here: ``"teacher": {"path": "teacher.safetensors"}`` and
``"training_file": "train.csv"`` (relative paths resolve against the spec's folder).
The service validates the body at its edge too; this second check is what makes a
spec the worker can't run a failed job with a clear error instead of a crash.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import SpecError
from .models import ACTIVATIONS, MAX_HIDDEN_LAYERS, MAX_LAYER_WIDTH

__all__ = ["Hyperparameters", "StudentSpec", "JobSpec", "TASKS", "MAX_EPOCHS"]

TASKS = ("classification",)
LR_SCHEDULERS = ("cosine", "constant")
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1 << 16


def _check_number(name: str, value, low: float, high: float, *, integer: bool = False, open_low: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise SpecError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if value < low or value > high or (open_low and value == low):
        raise SpecError(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {value!r}", param=name)


def _reject_unknown(cls, data: dict, prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"unknown field '{prefix}{unknown[0]}'", param=f"{prefix}{unknown[0]}")


@dataclass
class Hyperparameters:
    epochs: int = 20
    """Passes over the transfer set."""
    batch_size: int = 64
    """Samples per optimizer step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""
    temperature: float = 4.0
    """Softmax temperature T for the soft targets; the KL term is scaled by T²."""
    alpha: float = 0.5
    """Weight of the soft-target loss; 1 - alpha weighs hard-label cross-entropy (ignored without labels)."""
    seed: int = 0
    """Seeds initialisation, shuffling and the validation split."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    lr_scheduler: str = "cosine"
    """'cosine' decays to 10% of learning_rate over the run; 'constant' keeps it."""

    def __post_init__(self) -> None:
        p = "hyperparameters."
        _check_number(p + "epochs", self.epochs, 1, MAX_EPOCHS, integer=True)
        _check_number(p + "batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        _check_number(p + "learning_rate", self.learning_rate, 0, 10, open_low=True)
        _check_number(p + "temperature", self.temperature, 0, 1000, open_low=True)
        _check_number(p + "alpha", self.alpha, 0, 1)
        _check_number(p + "seed", self.seed, 0, 2**63 - 1, integer=True)
        _check_number(p + "weight_decay", self.weight_decay, 0, 10)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SpecError(f"{p}lr_scheduler must be one of {list(LR_SCHEDULERS)}", param=p + "lr_scheduler")


@dataclass
class StudentSpec:
    hidden_dims: list[int]
    """Hidden layer widths of the student MLP; input_dim and num_classes come from the teacher."""
    activation: str = "relu"

    def __post_init__(self) -> None:
        p = "student.architecture."
        if not isinstance(self.hidden_dims, list) or len(self.hidden_dims) > MAX_HIDDEN_LAYERS:
            raise SpecError(f"{p}hidden_dims must be a list of at most {MAX_HIDDEN_LAYERS} integers", param=p + "hidden_dims")
        for i, width in enumerate(self.hidden_dims):
            _check_number(f"{p}hidden_dims[{i}]", width, 1, MAX_LAYER_WIDTH, integer=True)
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"{p}activation must be one of {sorted(ACTIVATIONS)}", param=p + "activation")


@dataclass
class JobSpec:
    teacher: Path
    """Teacher model file (safetensors with a distill_architecture entry)."""
    training_file: Path
    """Transfer set: the inputs the teacher labels and the student learns from (labels optional)."""
    student: StudentSpec
    validation_file: Path | None = None
    """Held-out data for evaluation; without it, validation_split of the training file is held out."""
    validation_split: float = 0.2
    task: str = "classification"
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"task must be one of {list(TASKS)}, got {self.task!r}", param="task")
        _check_number("validation_split", self.validation_split, 0, 0.9, open_low=True)

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | Path = ".") -> "JobSpec":
        """Build from the JSON form; file references are paths relative to ``base_dir``."""
        if not isinstance(data, dict):
            raise SpecError("the spec must be a JSON object")
        _reject_unknown(cls, data, "")
        base = Path(base_dir)

        def path_of(name: str, value) -> Path:
            if isinstance(value, dict):
                if set(value) != {"path"}:
                    raise SpecError(f"{name} must be a path or {{\"path\": ...}} here", param=name)
                value = value["path"]
            if not isinstance(value, str) or not value:
                raise SpecError(f"{name} must be a file path", param=name)
            return base / value

        for required in ("teacher", "training_file", "student"):
            if required not in data:
                raise SpecError(f"'{required}' is required", param=required)
        student = data["student"]
        if not isinstance(student, dict) or not isinstance(student.get("architecture"), dict):
            raise SpecError("student must be {\"architecture\": {\"kind\": \"mlp\", \"hidden_dims\": [...]}}", param="student")
        architecture = dict(student["architecture"])
        if architecture.pop("kind", "mlp") != "mlp":
            raise SpecError("student.architecture.kind must be 'mlp'", param="student.architecture.kind")
        _reject_unknown(StudentSpec, architecture, "student.architecture.")
        if "hidden_dims" not in architecture:
            raise SpecError("student.architecture.hidden_dims is required", param="student.architecture.hidden_dims")
        hyper = data.get("hyperparameters") or {}
        if not isinstance(hyper, dict):
            raise SpecError("hyperparameters must be an object", param="hyperparameters")
        _reject_unknown(Hyperparameters, hyper, "hyperparameters.")
        validation = data.get("validation_file")
        return cls(
            teacher=path_of("teacher", data["teacher"]),
            training_file=path_of("training_file", data["training_file"]),
            validation_file=path_of("validation_file", validation) if validation is not None else None,
            validation_split=data.get("validation_split", 0.2),
            task=data.get("task", "classification"),
            student=StudentSpec(**architecture),
            hyperparameters=Hyperparameters(**hyper),
            metadata=data.get("metadata") or {},
        )

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "teacher": {"path": str(self.teacher)},
            "student": {"architecture": {"kind": "mlp", **asdict(self.student)}},
            "training_file": str(self.training_file),
            "validation_file": str(self.validation_file) if self.validation_file else None,
            "validation_split": self.validation_split,
            "hyperparameters": asdict(self.hyperparameters),
            "metadata": self.metadata,
        }
