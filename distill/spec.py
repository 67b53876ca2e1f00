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
                      ValidationInfo, field_validator, model_validator)

from .errors import SpecError
from .losses.registry import LOSS_TYPES
from .models import ACTIVATIONS, MAX_HIDDEN_LAYERS, MAX_LAYER_WIDTH
from .recipes import METHODS, TASKS, recipe_exists
from .text_data import DEFAULT_MAX_LENGTH

__all__ = ["Hyperparameters", "LossSpec", "TeacherSignalSpec", "GenerationSpec", "DataSpec", "OnPolicySpec",
           "IntermediateSpec", "LoraSpec", "WeightedTeacher", "MAX_TEACHERS", "check_combinations",
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
        None, gt=0, le=1000, description="Softmax temperature T of the soft targets; the divergence is scaled by T² (not loss uld, "
                                         "which compares probabilities, as in its paper). "
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


CROSS_TOKENIZER_LOSSES = ("uld",)
"""Losses that compare teacher and student across different tokenizers (not divergences over one vocabulary)."""


class LossSpec(SpecModel):
    type: Literal[LOSS_TYPES + CROSS_TOKENIZER_LOSSES] | None = Field(  # type: ignore[valid-type]
        None, description="The divergence (see distill/losses/registry.py), or 'uld' (Universal Logit Distillation: "
                          "a causal-LM student whose tokenizer differs from the teacher's). "
                          "Default: reverse_kl for method on_policy, else forward_kl")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL")


class TeacherSignalSpec(SpecModel):
    top_k: StrictInt | None = Field(None, ge=1, le=1 << 20,
                                    description="Keep only the teacher's top-k per position (plus the tail mass); "
                                                "the teacher then runs once, before training")
    full_logits: Literal["auto", "cache", "online"] = Field(
        "auto", description="Without top_k: 'cache' runs the teacher once and keeps its full-vocabulary logits "
                            "(float16) in the teacher-signal store when they fit its byte budget, so later epochs "
                            "and later jobs skip the teacher; 'online' runs the teacher on every batch; 'auto' "
                            "caches on CPU workers (reading 2 bytes per vocabulary entry is cheaper there than the "
                            "teacher) and runs online on GPUs (where it is the other way round)")


class GenerationSpec(SpecModel):
    """Teacher sampling for sequence-level KD."""

    max_new_tokens: StrictInt = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=10, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16, description="Completions per prompt")


class OnPolicySpec(SpecModel):
    """On-policy distillation (GKD, Agarwal et al. 2024): the student samples, the teacher scores."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)

    lambda_: float = Field(1.0, ge=0, le=1, alias="lambda",
                           description="Fraction of batches on the student's own samples; the rest use the "
                                       "dataset's completions. 1.0 is the Thinking Machines on-policy recipe")
    max_new_tokens: StrictInt = Field(64, ge=1, le=4096, description="Tokens the student samples per prompt")
    temperature: float = Field(1.0, ge=0, le=10, description="Student sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="Student nucleus sampling")


class IntermediateSpec(SpecModel):
    """Hidden-state (DistilBERT, TinyBERT) and attention (MiniLM) losses added to the output-level loss."""

    weight: float = Field(1.0, ge=0, le=1000, description="Weight of the intermediate term in the loss")
    type: Literal["cosine", "mse"] = Field("cosine", description="cosine: 1 − cos(student, teacher) per position "
                                                                 "(DistilBERT); mse: mean squared error (TinyBERT)")
    layers: Literal["uniform"] | list[Annotated[list[Annotated[StrictInt, Field(ge=0, le=4096)]],
                                                Field(min_length=2, max_length=2)]] = Field(
        "uniform", description="uniform: student block j ↔ teacher block round((j+1)·Lt/Ls)−1 (halves round up), "
                               "so the last blocks pair; or [[student_layer, teacher_layer], ...] (0-based block indices)")
    attention: StrictBool = Field(False, description="Add MiniLM's KL between the last layer's attention "
                                                     "distributions (needs equal head counts)")

    @model_validator(mode="after")
    def _some_pairs(self) -> "IntermediateSpec":
        if isinstance(self.layers, list) and not 1 <= len(self.layers) <= 1024:
            raise ValueError("layers needs 1 to 1024 [student_layer, teacher_layer] pairs")
        return self


class LoraSpec(SpecModel):
    """Train low-rank adapters only (PEFT LoRA); the download is the merged model."""

    r: StrictInt = Field(16, ge=1, le=1024, description="Adapter rank")
    alpha: float = Field(32, gt=0, le=65536, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input")
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(min_length=1, max_length=128,
                                                                      pattern=r"^[A-Za-z0-9_.]+$")]] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names")

    @model_validator(mode="after")
    def _some_modules(self) -> "LoraSpec":
        if isinstance(self.target_modules, list) and not 1 <= len(self.target_modules) <= 256:
            raise ValueError("target_modules needs 1 to 256 module names")
        return self


class DataSpec(SpecModel):
    """How text is cut into training sequences."""

    max_length: StrictInt | None = Field(
        None, ge=8, le=32768,
        description=f"Tokens per sequence; at most the models' context. Default: min({DEFAULT_MAX_LENGTH}, context)")
    packing: StrictBool = Field(True, description="Pack plain-text documents into full blocks "
                                                  "(ignored for prompt/completion and for loss uld)")


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
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters on the student instead of all its weights "
                                                    "(a pretrained or derived transformers student)")

    @field_validator("lora")
    @classmethod
    def _lora_needs_pretrained_weights(cls, lora: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        architecture = info.data.get("architecture")
        if lora is not None and isinstance(architecture, MLPStudentArchitecture):
            raise ValueError("LoRA adapts a transformers student; an MLP student trains all its weights")
        if lora is not None and architecture is not None:
            raise ValueError("an architecture student starts from random weights, which LoRA would leave frozen; "
                             "use LoRA with a pretrained (file_id/model_id/path) or derived student")
        return lora

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


MAX_TEACHERS = 8


class WeightedTeacher(SpecModel):
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative weight; weights are normalised to sum to 1")


def check_combinations(options: "JobOptions", teachers: int) -> None:
    """Option combinations that can't run, refused before any model loads (SpecError naming the field).
    ``teachers`` is how many teachers the spec names (1 for ``teacher``)."""
    method, task, loss = options.method, options.task, options.loss.type
    if loss in CROSS_TOKENIZER_LOSSES:
        if task != "causal_lm" or method != "token":
            raise SpecError(f"loss.type {loss!r} is for task causal_lm with method 'token'", param="loss.type")
        if options.teacher_signal.top_k is not None:
            raise SpecError(f"teacher_signal.top_k is not used with loss.type {loss!r} (it compares whole sorted "
                            "distributions); leave top_k out", param="teacher_signal.top_k")
    if options.intermediate is not None:
        if (task, method) not in (("causal_lm", "token"), ("text_classification", "token")):
            raise SpecError("intermediate is for task causal_lm (method token) and text_classification",
                            param="intermediate")
        if loss in CROSS_TOKENIZER_LOSSES:
            raise SpecError(f"intermediate compares hidden states position by position, which needs one tokenizer; "
                            f"it can't be combined with loss.type {loss!r}", param="intermediate")
        if teachers > 1:
            raise SpecError("intermediate matches one teacher's hidden states; use it with a single teacher",
                            param="intermediate")
    if method == "on_policy" and options.teacher_signal.top_k is not None:
        raise SpecError("teacher_signal.top_k is not used with method on_policy: the teacher scores the student's "
                        "fresh samples every batch", param="teacher_signal.top_k")
    if teachers > 1:
        if method != "token":
            raise SpecError(f"teachers (several) work with method 'token'; method {method!r} takes one teacher",
                            param="teachers")
        if loss in CROSS_TOKENIZER_LOSSES:
            raise SpecError(f"teachers (several) need one shared tokenizer; loss.type {loss!r} takes one teacher",
                            param="teachers")


class JobOptions(SpecModel):
    """Everything in a job spec except where its models and data come from."""

    task: Literal[TASKS] = "classification"  # type: ignore[valid-type]
    validation_split: float = Field(0.2, gt=0, le=0.9,
                                    description="Held out of the training file when there is no validation_file")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    metadata: dict[str, Any] = Field(default_factory=dict)
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "token", description="token: match the teacher's distributions; sequence: train on teacher-generated text; "
                             "on_policy (causal_lm): the student samples, the teacher scores every token (GKD)")
    loss: LossSpec = Field(default_factory=LossSpec)
    teacher_signal: TeacherSignalSpec = Field(default_factory=TeacherSignalSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    on_policy: OnPolicySpec = Field(default_factory=OnPolicySpec, description="Settings of method on_policy")
    intermediate: IntermediateSpec | None = Field(
        None, description="Hidden-state (and attention) losses between the models' layers, added to the "
                          "output-level loss (causal_lm token, text_classification)")

    @field_validator("method")
    @classmethod
    def _method_for_task(cls, method: str, info: ValidationInfo) -> str:
        task = info.data.get("task")
        if task is not None and not recipe_exists(task, method):
            available = ", ".join(m for m in METHODS if recipe_exists(task, m))
            raise ValueError(f"method {method!r} is not available for task {task!r} (available: {available})")
        return method

    @model_validator(mode="after")
    def _task_rules(self):
        if not recipe_exists(self.task, self.method):
            raise ValueError(f"method {self.method!r} is not available for task {self.task!r}")
        if self.hyperparameters.temperature is None:
            self.hyperparameters.temperature = DEFAULT_TEMPERATURE.get(self.task, 1.0)
        if self.loss.type is None:
            self.loss.type = "reverse_kl" if self.method == "on_policy" else "forward_kl"
        return self


class TeacherPath(WeightedTeacher):
    path: Path


class JobSpec(JobOptions):
    teacher: Path | None = Field(None, description="Teacher: an MLP model file or a transformers directory")
    teachers: list[TeacherPath] | None = Field(
        None, min_length=2, max_length=MAX_TEACHERS,
        description="Several teachers in place of teacher: the target is their weighted mixture at temperature T")
    training_file: Path = Field(..., description="Transfer set (labels optional)")
    validation_file: Path | None = None
    student: StudentSpec

    @model_validator(mode="after")
    def _student_fits_task(self) -> "JobSpec":
        if (self.teacher is None) == (self.teachers is None):
            raise SpecError("give exactly one of teacher or teachers", param="teacher")
        try:
            check_student_for_task(self.task, self.student)
        except ValueError as exc:
            raise SpecError(str(exc), param="student") from None
        check_combinations(self, len(self.teachers or ()) or 1)
        return self

    @property
    def teacher_paths(self) -> list[tuple[Path, float]]:
        """Every teacher with its weight, normalised to sum to 1 (one teacher: weight 1)."""
        if self.teachers is None:
            return [(self.teacher, 1.0)]
        total = sum(t.weight for t in self.teachers)
        return [(t.path, t.weight / total) for t in self.teachers]

    @property
    def primary_teacher(self) -> Path:
        """The teacher a derived student copies and whose tokenizer and config the student follows (the first)."""
        return self.teacher if self.teacher is not None else self.teachers[0].path

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
        if isinstance(data.get("teachers"), list):
            data["teachers"] = [{**t, "path": _local_path(f"teachers[{i}].path", t.get("path"), base)}
                                if isinstance(t, dict) else t for i, t in enumerate(data["teachers"])]
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
        names = {"teacher": meta.get("teacher_name") or meta.get("teachers[0]_name") or self.primary_teacher.name,
                 "training_file": meta.get("training_name") or self.training_file.name}
        if self.teachers is not None:
            for i, teacher in enumerate(self.teachers):
                names[f"teachers[{i}]"] = meta.get(f"teachers[{i}]_name") or teacher.path.name
        if self.validation_file is not None:
            names["validation_file"] = meta.get("validation_name") or self.validation_file.name
        if self.student.path is not None:
            names["student"] = meta.get("student_name") or self.student.path.name
        return names

    def public_dict(self) -> dict:
        """``to_dict`` with files by name: safe to ship in a model or show to users."""
        names = self.input_names()
        public = {**self.to_dict(), **{k: v for k, v in names.items() if not k.startswith("teachers[") and k != "student"}}
        if self.teachers is not None:
            del public["teacher"]
            public["teachers"] = [{"name": names[f"teachers[{i}]"], "weight": weight}
                                  for i, (_, weight) in enumerate(self.teacher_paths)]
        if self.student.path is not None:
            public["student"] = {**public["student"], "path": names["student"]}
        return public


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
