"""Request and response bodies: the public contract. Families follow Create / Public / ListPublic."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationInfo, field_validator, model_validator

from distill.spec import MAX_TEACHERS, JobOptions, StudentForms, WeightedTeacher, check_student_for_task

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FilePurpose = Literal["dataset", "model"]
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Every id this service mints ("file-<hex>", "job-<hex>", "model-<hex>") matches; anything else
(a NUL byte, a control character, 10 kB of text) is refused before it reaches a query."""
SERVER_PATH_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # no NUL or control characters in a server-side path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- files -------------------------------------------------------------------------------------------------

class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    sha256: str
    purpose: FilePurpose
    created_at: int
    details: dict[str, Any] = Field(description="What validation found: rows/num_features/has_labels or architecture")
    kind: str | None = Field(None, description="Model files: the model kind (mlp | hf); null for datasets")


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ---- jobs --------------------------------------------------------------------------------------------------

class ModelReference(Strict):
    """A model to load, named one of three ways."""

    file_id: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                description="An uploaded model file or archive (purpose=model)")
    model_id: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                 description="A finished model of this service")
    path: str | None = Field(None, min_length=1, max_length=1024, pattern=SERVER_PATH_PATTERN,
                             description="A server-side model directory under DISTILL_MODELS_DIR")

    def reference(self) -> dict | None:
        """{"file_id"|"model_id"|"path": ...} when a model is named, else None."""
        refs = {k: getattr(self, k) for k in ("file_id", "model_id", "path") if getattr(self, k) is not None}
        return refs or None


class TeacherRef(ModelReference):
    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherRef":
        if sum(v is not None for v in (self.file_id, self.model_id, self.path)) != 1:
            raise ValueError("give exactly one of file_id, model_id or path")
        return self


class WeightedTeacherRef(WeightedTeacher, TeacherRef):
    """One of several teachers: a model reference and its weight in the mixture."""


class StudentRef(StudentForms, ModelReference):
    """The student: an architecture, layers derived from the teacher, or a pretrained model
    (``file_id``/``model_id``/``path``). The forms without a file are declared in distill/spec.py."""


class JobCreate(JobOptions):
    """A job: where the teacher, student and data come from (by id), plus the options every
    job spec has (task, method, hyperparameters, loss, ...), declared once in distill/spec.py."""

    teacher: TeacherRef | None = Field(None, description="The teacher (or give teachers)")
    teachers: list[WeightedTeacherRef] | None = Field(
        None, min_length=2, max_length=MAX_TEACHERS,
        description="Several teachers in place of teacher: the target is the weighted mixture of their "
                    "probabilities at temperature T (classification, text_classification, causal_lm token with "
                    "one shared tokenizer)")
    student: StudentRef
    training_file: str = Field(..., min_length=1, max_length=64, pattern=ID_PATTERN,
                               description="Dataset file id: the transfer set (labels optional)")
    validation_file: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                        description="Dataset file id; else validation_split is held out")

    @field_validator("student")
    @classmethod
    def _student_fits_task(cls, student: StudentRef, info: ValidationInfo) -> StudentRef:
        if "task" in info.data:  # fields validate in order: task (JobOptions) comes first
            check_student_for_task(info.data["task"], student)
        return student

    def teacher_refs(self) -> list[tuple[str, dict, float]]:
        """(param, reference, normalised weight) for every teacher."""
        if self.teachers is None:
            return [("teacher", self.teacher.reference(), 1.0)]
        total = sum(t.weight for t in self.teachers)
        return [(f"teachers[{i}]", t.reference(), t.weight / total) for i, t in enumerate(self.teachers)]

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict) -> dict:
        if len(json.dumps(metadata)) > 16_384:
            raise ValueError("metadata must serialise to at most 16 KiB of JSON")
        return metadata


class JobProgress(BaseModel):
    epoch: int = 0
    step: int = 0
    total_steps: int = 0


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["distillation.job"] = "distillation.job"
    status: JobStatus
    created_at: int
    started_at: int | None
    finished_at: int | None
    spec: dict[str, Any]
    progress: JobProgress
    metrics: dict[str, Any]
    error: JobError | None
    result_model_id: str | None
    result_files: list[str] = Field(default_factory=list,
                                    description="Files the job produced, e.g. the teacher-generated set")
    device: str | None = Field(None, description="The device the worker ran the job on")
    cancel_requested: bool = False


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobEventPublic(BaseModel):
    id: int
    object: Literal["distillation.job.event"] = "distillation.job.event"
    created_at: int
    type: str
    message: str
    data: dict[str, Any]


class JobEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


# ---- models ------------------------------------------------------------------------------------------------

class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created_at: int
    job_id: str | None
    task: str
    kind: str = Field("mlp", description="The model kind: mlp (a safetensors model file) | hf (transformers)")
    architecture: dict[str, Any]
    parameters: int
    size_bytes: int
    sha256: str
    evaluation: dict[str, Any]


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class PredictRequest(Strict):
    inputs: list[list[FiniteFloat]] | list[str] = Field(
        ..., min_length=1, description="Rows of features (MLP classifiers) or texts (text classifiers)")


class Prediction(BaseModel):
    label: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    predictions: list[Prediction]


# ---- OpenAI-compatible completions -------------------------------------------------------------------------------

class _GenerationRequest(BaseModel):
    # Unknown OpenAI fields (frequency_penalty, user, ...) are accepted and ignored, so clients work unchanged.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="A model id of this service")
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops")
    seed: int | None = None
    stream: Literal[False] = Field(False, description="Streaming is not supported yet")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts")

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, prompt):
        if isinstance(prompt, list) and not 1 <= len(prompt) <= 64:
            raise ValueError("give 1 to 64 prompts")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
