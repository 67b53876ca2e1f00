"""The job spec, declared once: pydantic models that the engine validates a spec file
with and that the HTTP API (``app/schemas.py``) reuses for its request body and its
OpenAPI schema. Bounds, defaults and descriptions live here and nowhere else.

The JSON is the body ``POST /v1/distillation/jobs`` takes, except that the engine's
:class:`JobSpec` names files by local path: ``"teacher": {"path": "teacher.safetensors"}``
and ``"training_file": "train.csv"`` (relative paths resolve against the spec's folder),
where the API's ``JobCreate`` names them by file id. Both inherit :class:`JobOptions`.

The engine validates again what the service validated at its edge: a spec the worker
can't run becomes a failed job with a clear error (``SpecError`` naming the field),
never a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag, ValidationError,
                      model_validator)

from .errors import SpecError
from .losses.registry import LOSS_TYPES
from .models import ACTIVATIONS, MAX_HIDDEN_LAYERS, MAX_LAYER_WIDTH
from .recipes import METHODS, TASKS, recipe_exists
from .text_data import DEFAULT_MAX_LENGTH

__all__ = ["Hyperparameters", "LossSpec", "TeacherSignalSpec", "GenerationSpec", "DataSpec",
           "MLPStudentArchitecture", "HFStudentArchitecture", "DeriveStudent", "StudentForms", "StudentSpec",
           "JobOptions", "JobSpec", "TASKS", "METHODS", "LOSS_TYPES", "MAX_EPOCHS", "MAX_BATCH_SIZE",
           "DEFAULT_TEMPERATURE", "DEFAULT_MAX_LENGTH", "error_location", "error_param", "check_student_for_task"]

DEFAULT_TEMPERATURE = {"classification": 4.0, "causal_lm": 1.0, "text_classification": 2.0}
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1 << 16
MAX_ACCUMULATION = 1024


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Hyperparameters(SpecModel):
    epochs: StrictInt = Field(20, ge=1, le=MAX_EPOCHS, description="Passes over the transfer set")
    batch_size: StrictInt = Field(64, ge=1, le=MAX_BATCH_SIZE, description="Rows (sequences) per forward pass")
    gradient_accumulation_steps: StrictInt = Field(
        1, ge=1, le=MAX_ACCUMULATION,
        description="Batches per optimizer step: the effective batch is batch_size × this")
    learning_rate: float = Field(1e-3, gt=0, le=10, description="Peak AdamW learning rate")
    temperature: float | None = Field(
        None, gt=0, le=1000, description="Softmax temperature T of the soft targets; the divergence is scaled by T². "
                                         "Default by task: 4.0 classification, 2.0 text_classification, 1.0 causal_lm")
    alpha: float = Field(0.5, ge=0, le=1,
                         description="Weight of the soft-target loss; 1 - alpha weighs the labels' cross-entropy "
                                     "(ignored without labels)")
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1, description="Seeds initialisation, shuffling and the split")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW decoupled weight decay")
    lr_scheduler: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine decays to 10% of learning_rate over the run; constant keeps it")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient-norm clipping; 0 = off")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU")


class LossSpec(SpecModel):
    type: Literal[LOSS_TYPES] = Field("forward_kl", description="The divergence; see distill/losses/registry.py")  # type: ignore[valid-type]
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL")


class TeacherSignalSpec(SpecModel):
    top_k: StrictInt | None = Field(None, ge=1, le=1 << 20,
                                    description="Keep only the teacher's top-k per position (plus the tail mass); "
                                                "the teacher then runs once, before training")


class GenerationSpec(SpecModel):
    """Teacher sampling for sequence-level KD."""

    max_new_tokens: StrictInt = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=10, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16, description="Completions per prompt")


class DataSpec(SpecModel):
    """How text is cut into training sequences."""

    max_length: StrictInt | None = Field(
        None, ge=8, le=32768,
        description=f"Tokens per sequence; at most the models' context. Default: min({DEFAULT_MAX_LENGTH}, context)")
    packing: StrictBool = Field(True, description="Pack plain-text documents into full blocks "
                                                  "(ignored for prompt/completion)")


class MLPStudentArchitecture(SpecModel):
    kind: Literal["mlp"] = "mlp"
    hidden_dims: list[Annotated[StrictInt, Field(ge=1, le=MAX_LAYER_WIDTH)]] = Field(
        ..., max_length=MAX_HIDDEN_LAYERS, description="Hidden widths; input_dim and num_classes come from the teacher")
    activation: Literal[tuple(sorted(ACTIVATIONS))] = "relu"  # type: ignore[valid-type]


class HFStudentArchitecture(SpecModel):
    kind: Literal["hf"]
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="Overrides of the teacher's config (same family, fresh weights)")


def _architecture_kind(value: Any) -> str | None:
    kind = value.get("kind", "mlp") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("mlp", "hf") else None


StudentArchitecture = Annotated[
    Union[Annotated[MLPStudentArchitecture, Tag("mlp")], Annotated[HFStudentArchitecture, Tag("hf")]],
    Discriminator(_architecture_kind, custom_error_type="invalid_kind",
                  custom_error_message="kind must be 'mlp' or 'hf'"),
]


class DeriveStudent(SpecModel):
    num_layers: StrictInt | None = Field(None, ge=1, le=1024, description="k layers evenly spaced over the teacher's")
    layers: list[Annotated[StrictInt, Field(ge=0, le=4096)]] | None = Field(
        None, min_length=1, max_length=1024, description="Teacher layer indices to keep, in order")

    @model_validator(mode="after")
    def _exactly_one(self) -> "DeriveStudent":
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of num_layers or layers")
        return self


STUDENT_FORMS = ("architecture", "derive", "file_id", "model_id", "path")


class StudentForms(SpecModel):
    """The student forms that don't name a file; the engine and the API add their references."""

    architecture: StudentArchitecture | None = Field(
        None, description='{"kind": "mlp", "hidden_dims": [...]} or {"kind": "hf", "config": {...}}')
    derive: DeriveStudent | None = Field(None, description="Initialise from the teacher's embeddings, layers, head")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in STUDENT_FORMS if getattr(self, name, None) is not None]
        if len(given) != 1:
            names = [name for name in STUDENT_FORMS if name in type(self).model_fields]
            raise ValueError(f"give exactly one of {', '.join(names)}")
        return self

    @property
    def is_mlp(self) -> bool:
        return isinstance(self.architecture, MLPStudentArchitecture)


class StudentSpec(StudentForms):
    path: Path | None = Field(None, description="A pretrained transformers student directory")


def check_student_for_task(task: str, student: StudentForms) -> None:
    if (task == "classification") != student.is_mlp:
        raise ValueError("an MLP student goes with task 'classification'; text tasks need a transformers student "
                         "(file_id/model_id/path, architecture kind 'hf', or derive)")


class JobOptions(SpecModel):
    """Everything in a job spec except where its models and data come from."""

    task: Literal[TASKS] = "classification"  # type: ignore[valid-type]
    validation_split: float = Field(0.2, gt=0, le=0.9,
                                    description="Held out of the training file when there is no validation_file")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    metadata: dict[str, Any] = Field(default_factory=dict)
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "token", description="token: match the teacher's distributions; sequence: train on teacher-generated text")
    loss: LossSpec = Field(default_factory=LossSpec)
    teacher_signal: TeacherSignalSpec = Field(default_factory=TeacherSignalSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    data: DataSpec = Field(default_factory=DataSpec)

    @model_validator(mode="after")
    def _task_rules(self):
        if not recipe_exists(self.task, self.method):
            raise ValueError(f"method {self.method!r} is not available for task {self.task!r}")
        if self.hyperparameters.temperature is None:
            self.hyperparameters.temperature = DEFAULT_TEMPERATURE.get(self.task, 1.0)
        return self


class JobSpec(JobOptions):
    teacher: Path = Field(..., description="Teacher: an MLP model file or a transformers directory")
    training_file: Path = Field(..., description="Transfer set (labels optional)")
    validation_file: Path | None = None
    student: StudentSpec

    @model_validator(mode="after")
    def _student_fits_task(self) -> "JobSpec":
        try:
            check_student_for_task(self.task, self.student)
        except ValueError as exc:
            raise SpecError(str(exc), param="student") from None
        return self

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> "JobSpec":
        """Build from the JSON form; file references are paths relative to ``base_dir``."""
        if not isinstance(data, dict):
            raise SpecError("the spec must be a JSON object")
        base = Path(base_dir)
        data = dict(data)
        for name in ("teacher", "training_file", "validation_file"):
            if data.get(name) is not None:
                data[name] = _local_path(name, data[name], base)
        student = data.get("student")
        if isinstance(student, dict) and isinstance(student.get("path"), str):
            data["student"] = {**student, "path": _local_path("student.path", student["path"], base)}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error(exc) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def input_names(self) -> dict[str, str]:
        """How users know the inputs (the service puts file id and filename in ``metadata``):
        what model cards, state files and events show, never a server path."""
        meta = self.metadata
        names = {"teacher": meta.get("teacher_name") or self.teacher.name,
                 "training_file": meta.get("training_name") or self.training_file.name}
        if self.validation_file is not None:
            names["validation_file"] = meta.get("validation_name") or self.validation_file.name
        if self.student.path is not None:
            names["student"] = meta.get("student_name") or self.student.path.name
        return names

    def public_dict(self) -> dict:
        """``to_dict`` with files by name: safe to ship in a model or show to users."""
        names = self.input_names()
        return {**self.to_dict(), **names, **({"student": {"path": names["student"]}} if "student" in names else {})}


def _local_path(name: str, value: Any, base: Path) -> Any:
    """'x' or {"path": "x"} -> base / x; anything else is left for validation to refuse."""
    if isinstance(value, dict):
        if set(value) != {"path"}:
            raise SpecError(f"{name} must be a path or {{\"path\": ...}} here", param=name)
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise SpecError(f"{name} must be a file path", param=name)
    return base / value


# Tagged unions put the tag in the error location (student.architecture.mlp.hidden_dims);
# the field the user wrote has no such segment.
UNION_TAGS = {"architecture": {"mlp", "hf"}}
_LOCATION_ROOTS = ("body", "query", "path", "form", "header")


def error_location(loc: tuple) -> str:
    """('body', 'hyperparameters', 'epochs') -> 'hyperparameters.epochs'; list indexes as [i]."""
    parts = [p for i, p in enumerate(loc) if not (i == 0 and p in _LOCATION_ROOTS)]
    parts = [p for i, p in enumerate(parts) if not (i and p in UNION_TAGS.get(parts[i - 1], ()))]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def error_param(error: dict) -> str:
    """The field a pydantic error is about, as the user wrote it."""
    location = error_location(tuple(error["loc"]))
    return f"{location}.kind" if error["type"] == "invalid_kind" else location


def spec_error(exc: ValidationError) -> SpecError:
    first = exc.errors()[0]
    param = error_param(first) or None
    message = first["msg"].removeprefix("Value error, ")
    return SpecError(f"{param}: {message}" if param else message, param=param)
