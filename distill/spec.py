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

__all__ = ["Hyperparameters", "StudentSpec", "HFStudentSpec", "LossSpec", "TeacherSignalSpec", "GenerationSpec",
           "DataSpec", "JobSpec", "TASKS", "TEXT_TASKS", "METHODS", "LOSS_TYPES", "MAX_EPOCHS"]

TASKS = ("classification", "causal_lm", "text_classification")
TEXT_TASKS = ("causal_lm", "text_classification")
METHODS = ("token", "sequence")
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "tvd")
DEFAULT_TEMPERATURE = {"classification": 4.0, "causal_lm": 1.0, "text_classification": 2.0}
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
    temperature: float | None = None
    """Softmax temperature T for the soft targets; the divergence is scaled by T².
    Default by task: 4.0 classification, 2.0 text_classification, 1.0 causal_lm."""
    alpha: float = 0.5
    """Weight of the soft-target loss; 1 - alpha weighs hard-label cross-entropy (ignored without labels)."""
    seed: int = 0
    """Seeds initialisation, shuffling and the validation split."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    lr_scheduler: str = "cosine"
    """'cosine' decays to 10% of learning_rate over the run; 'constant' keeps it."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping for transformer students (0 = off); MLP students are not clipped."""

    def __post_init__(self) -> None:
        p = "hyperparameters."
        _check_number(p + "epochs", self.epochs, 1, MAX_EPOCHS, integer=True)
        _check_number(p + "batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        _check_number(p + "learning_rate", self.learning_rate, 0, 10, open_low=True)
        if self.temperature is not None:
            _check_number(p + "temperature", self.temperature, 0, 1000, open_low=True)
        _check_number(p + "alpha", self.alpha, 0, 1)
        _check_number(p + "seed", self.seed, 0, 2**63 - 1, integer=True)
        _check_number(p + "weight_decay", self.weight_decay, 0, 10)
        _check_number(p + "max_grad_norm", self.max_grad_norm, 0, 1e6)
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
class HFStudentSpec:
    """A transformers student: a pretrained model (``path``), the teacher's config with
    ``config`` overrides and fresh weights, or layers ``derive``d from the teacher."""

    source: str
    """'pretrained' | 'config' | 'derive'."""
    path: Path | None = None
    config: dict = field(default_factory=dict)
    layers: list[int] | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.source not in ("pretrained", "config", "derive"):
            raise SpecError(f"unknown student source {self.source!r}", param="student")
        if self.source == "derive":
            if (self.layers is None) == (self.num_layers is None):
                raise SpecError("student.derive needs exactly one of num_layers or layers", param="student.derive")
            if self.num_layers is not None:
                _check_number("student.derive.num_layers", self.num_layers, 1, 1024, integer=True)
            if self.layers is not None:
                if not isinstance(self.layers, list) or not self.layers:
                    raise SpecError("student.derive.layers must be a non-empty list", param="student.derive.layers")
                for i, layer in enumerate(self.layers):
                    _check_number(f"student.derive.layers[{i}]", layer, 0, 4096, integer=True)
        if self.source == "config" and not isinstance(self.config, dict):
            raise SpecError("student.architecture.config must be an object", param="student.architecture.config")


@dataclass
class LossSpec:
    type: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | tvd (token-level for language models)."""
    beta: float = 0.5
    """Generalized JSD interpolation: 0 = forward KL, 1 = reverse KL."""

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise SpecError(f"loss.type must be one of {list(LOSS_TYPES)}, got {self.type!r}", param="loss.type")
        _check_number("loss.beta", self.beta, 0, 1)


@dataclass
class TeacherSignalSpec:
    top_k: int | None = None
    """Use only the teacher's top-k probabilities per position (the tail mass as one bucket)."""

    def __post_init__(self) -> None:
        if self.top_k is not None:
            _check_number("teacher_signal.top_k", self.top_k, 1, 1 << 20, integer=True)


@dataclass
class GenerationSpec:
    """Teacher sampling for sequence-level KD."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    n: int = 1
    """Completions per prompt."""

    def __post_init__(self) -> None:
        _check_number("generation.max_new_tokens", self.max_new_tokens, 1, 4096, integer=True)
        _check_number("generation.temperature", self.temperature, 0, 10)
        _check_number("generation.top_p", self.top_p, 0, 1, open_low=True)
        _check_number("generation.n", self.n, 1, 16, integer=True)


@dataclass
class DataSpec:
    """How text is cut into training sequences."""

    max_length: int = 256
    """Tokens per sequence; longer texts are truncated (prompt/completion: from the completion's end)."""
    packing: bool = True
    """Concatenate plain-text documents into full max_length blocks (ignored for prompt/completion)."""

    def __post_init__(self) -> None:
        _check_number("data.max_length", self.max_length, 8, 32768, integer=True)
        if not isinstance(self.packing, bool):
            raise SpecError("data.packing must be true or false", param="data.packing")


@dataclass
class JobSpec:
    teacher: Path
    """Teacher model file (safetensors with a distill_architecture entry)."""
    training_file: Path
    """Transfer set: the inputs the teacher labels and the student learns from (labels optional)."""
    student: StudentSpec | HFStudentSpec
    validation_file: Path | None = None
    """Held-out data for evaluation; without it, validation_split of the training file is held out."""
    validation_split: float = 0.2
    task: str = "classification"
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    metadata: dict = field(default_factory=dict)
    method: str = "token"
    """'token': match the teacher's distributions; 'sequence': train on teacher-generated text (causal_lm)."""
    loss: LossSpec = field(default_factory=LossSpec)
    teacher_signal: TeacherSignalSpec = field(default_factory=TeacherSignalSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    data: DataSpec = field(default_factory=DataSpec)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"task must be one of {list(TASKS)}, got {self.task!r}", param="task")
        _check_number("validation_split", self.validation_split, 0, 0.9, open_low=True)
        if self.method not in METHODS:
            raise SpecError(f"method must be one of {list(METHODS)}, got {self.method!r}", param="method")
        if self.method == "sequence" and self.task != "causal_lm":
            raise SpecError("method 'sequence' needs task 'causal_lm'", param="method")
        text = self.task in TEXT_TASKS
        if text != isinstance(self.student, HFStudentSpec):
            raise SpecError("an MLP student goes with task 'classification'; text tasks need a transformers student"
                            " (file_id/model_id, architecture kind 'hf', or derive)", param="student")
        if self.hyperparameters.temperature is None:
            self.hyperparameters.temperature = DEFAULT_TEMPERATURE[self.task]

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
        hyper = data.get("hyperparameters") or {}
        if not isinstance(hyper, dict):
            raise SpecError("hyperparameters must be an object", param="hyperparameters")
        _reject_unknown(Hyperparameters, hyper, "hyperparameters.")
        validation = data.get("validation_file")
        sections = {name: _section(kind, data.get(name), name)
                    for name, kind in (("loss", LossSpec), ("teacher_signal", TeacherSignalSpec),
                                       ("generation", GenerationSpec), ("data", DataSpec))}
        return cls(
            teacher=path_of("teacher", data["teacher"]),
            training_file=path_of("training_file", data["training_file"]),
            validation_file=path_of("validation_file", validation) if validation is not None else None,
            validation_split=data.get("validation_split", 0.2),
            task=data.get("task", "classification"),
            student=_student(data["student"], path_of),
            hyperparameters=Hyperparameters(**hyper),
            metadata=data.get("metadata") or {},
            method=data.get("method", "token"),
            **sections,
        )

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "teacher": {"path": str(self.teacher)},
            "student": _student_dict(self.student),
            "training_file": str(self.training_file),
            "validation_file": str(self.validation_file) if self.validation_file else None,
            "validation_split": self.validation_split,
            "hyperparameters": asdict(self.hyperparameters),
            "metadata": self.metadata,
            "method": self.method,
            "loss": asdict(self.loss),
            "teacher_signal": asdict(self.teacher_signal),
            "generation": asdict(self.generation),
            "data": asdict(self.data),
        }


def _section(cls, value, name: str):
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be an object", param=name)
    _reject_unknown(cls, value, f"{name}.")
    return cls(**value)


STUDENT_FORMS = ('{"architecture": {"kind": "mlp", "hidden_dims": [...]}}, {"architecture": {"kind": "hf", '
                 '"config": {...}}}, {"derive": {"num_layers": k}}, {"derive": {"layers": [...]}} or {"path": ...}')


def _student(value, path_of) -> StudentSpec | HFStudentSpec:
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(f"student must be one of {STUDENT_FORMS}", param="student")
    (form, body), = value.items()
    if form in ("path", "file_id", "model_id"):
        return HFStudentSpec(source="pretrained", path=path_of("student", {"path": body} if form == "path" else body))
    if form == "derive":
        if not isinstance(body, dict):
            raise SpecError("student.derive must be an object", param="student.derive")
        unknown = sorted(set(body) - {"num_layers", "layers"})
        if unknown:
            raise SpecError(f"unknown field 'student.derive.{unknown[0]}'", param=f"student.derive.{unknown[0]}")
        return HFStudentSpec(source="derive", layers=body.get("layers"), num_layers=body.get("num_layers"))
    if form != "architecture" or not isinstance(body, dict):
        raise SpecError(f"student must be one of {STUDENT_FORMS}", param="student")
    architecture = dict(body)
    kind = architecture.pop("kind", "mlp")
    if kind == "hf":
        unknown = sorted(set(architecture) - {"config"})
        if unknown:
            raise SpecError(f"unknown field 'student.architecture.{unknown[0]}'",
                            param=f"student.architecture.{unknown[0]}")
        return HFStudentSpec(source="config", config=architecture.get("config") or {})
    if kind != "mlp":
        raise SpecError("student.architecture.kind must be 'mlp' or 'hf'", param="student.architecture.kind")
    _reject_unknown(StudentSpec, architecture, "student.architecture.")
    if "hidden_dims" not in architecture:
        raise SpecError("student.architecture.hidden_dims is required", param="student.architecture.hidden_dims")
    return StudentSpec(**architecture)


def _student_dict(student: StudentSpec | HFStudentSpec) -> dict:
    if isinstance(student, StudentSpec):
        return {"architecture": {"kind": "mlp", **asdict(student)}}
    if student.source == "pretrained":
        return {"path": str(student.path)}
    if student.source == "config":
        return {"architecture": {"kind": "hf", "config": student.config}}
    return {"derive": {"layers": student.layers} if student.layers is not None else {"num_layers": student.num_layers}}
