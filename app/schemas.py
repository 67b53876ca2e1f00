"""Request and response bodies: the public contract. Families follow Create / Public / ListPublic."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from distill.models import ACTIVATIONS, MAX_HIDDEN_LAYERS, MAX_LAYER_WIDTH
from distill.spec import DEFAULT_TEMPERATURE, MAX_BATCH_SIZE, MAX_EPOCHS

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FilePurpose = Literal["dataset", "model"]
Activation = Literal[tuple(sorted(ACTIVATIONS))]  # type: ignore[valid-type]


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

class TeacherRef(Strict):
    file_id: str | None = Field(None, description="An uploaded model file or archive (purpose=model)")
    model_id: str | None = Field(None, description="A finished model of this service")
    path: str | None = Field(None, description="A server-side model directory under DISTILL_MODELS_DIR")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherRef":
        if sum(v is not None for v in (self.file_id, self.model_id, self.path)) != 1:
            raise ValueError("give exactly one of file_id, model_id or path")
        return self


class StudentArchitecture(Strict):
    kind: Literal["mlp"] = "mlp"
    hidden_dims: list[int] = Field(..., max_length=MAX_HIDDEN_LAYERS,
                                   description="Hidden widths; input_dim and num_classes come from the teacher")
    activation: Activation = "relu"

    @field_validator("hidden_dims")
    @classmethod
    def _widths(cls, widths: list[int]) -> list[int]:
        for i, width in enumerate(widths):
            if not 1 <= width <= MAX_LAYER_WIDTH:
                raise ValueError(f"hidden_dims[{i}] must be in [1, {MAX_LAYER_WIDTH}]")
        return widths


class HFStudentArchitecture(Strict):
    kind: Literal["hf"]
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="Overrides of the teacher's config (same family, fresh weights)")


class DeriveStudent(Strict):
    num_layers: int | None = Field(None, ge=1, le=1024, description="k layers evenly spaced over the teacher's")
    layers: list[int] | None = Field(None, min_length=1, max_length=1024, description="teacher layer indices")

    @model_validator(mode="after")
    def _exactly_one(self) -> "DeriveStudent":
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of num_layers or layers")
        return self



class StudentRef(Strict):
    architecture: StudentArchitecture | HFStudentArchitecture | None = Field(None, discriminator="kind")
    derive: DeriveStudent | None = Field(None, description="Initialise from the teacher's embeddings, layers, head")
    file_id: str | None = Field(None, description="A smaller pretrained model (uploaded archive)")
    model_id: str | None = Field(None, description="A finished model of this service")
    path: str | None = Field(None, description="A server-side model directory under DISTILL_MODELS_DIR")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StudentRef":
        given = [n for n in ("architecture", "derive", "file_id", "model_id", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of architecture, derive, file_id, model_id or path")
        return self


class HyperparametersIn(Strict):
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    temperature: float | None = Field(None, gt=0, le=1000,
                                      description="Default by task: 4.0 classification, 2.0 text_classification, "
                                                  "1.0 causal_lm")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target loss; 1-alpha on labels, if any")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Clipping for transformer students; 0 = off")


class LossIn(Strict):
    type: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL")


class TeacherSignalIn(Strict):
    top_k: int | None = Field(None, ge=1, le=1 << 20, description="Use only the teacher's top-k per position")


class GenerationIn(Strict):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=10, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)


class DataIn(Strict):
    max_length: int = Field(256, ge=8, le=32768, description="Tokens per training sequence")
    packing: bool = Field(True, description="Pack plain-text documents into full blocks")


class JobCreate(Strict):
    task: Literal["classification", "causal_lm", "text_classification"] = "classification"
    teacher: TeacherRef
    student: StudentRef
    training_file: str = Field(..., description="Dataset file id: the transfer set (labels optional)")
    validation_file: str | None = Field(None, description="Dataset file id; else validation_split is held out")
    validation_split: float = Field(0.2, gt=0, le=0.9)
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    metadata: dict[str, Any] = Field(default_factory=dict)
    method: Literal["token", "sequence"] = Field("token", description="sequence: train on teacher-generated text")
    loss: LossIn = Field(default_factory=LossIn)
    teacher_signal: TeacherSignalIn = Field(default_factory=TeacherSignalIn)
    generation: GenerationIn = Field(default_factory=GenerationIn)
    data: DataIn = Field(default_factory=DataIn)

    @model_validator(mode="after")
    def _task_defaults(self) -> "JobCreate":
        if self.hyperparameters.temperature is None:
            self.hyperparameters.temperature = DEFAULT_TEMPERATURE[self.task]
        return self

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
