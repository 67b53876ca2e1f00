"""Request and response bodies: the public contract. Families follow Create / Public / ListPublic."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from distill.models import ACTIVATIONS, MAX_HIDDEN_LAYERS, MAX_LAYER_WIDTH
from distill.spec import MAX_BATCH_SIZE, MAX_EPOCHS

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
    file_id: str | None = Field(None, description="An uploaded model file (purpose=model)")
    model_id: str | None = Field(None, description="A finished student of this service")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherRef":
        if (self.file_id is None) == (self.model_id is None):
            raise ValueError("give exactly one of file_id or model_id")
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


class StudentRef(Strict):
    architecture: StudentArchitecture


class HyperparametersIn(Strict):
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    temperature: float = Field(4.0, gt=0, le=1000)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target loss; 1-alpha on labels, if any")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"


class JobCreate(Strict):
    task: Literal["classification"] = "classification"
    teacher: TeacherRef
    student: StudentRef
    training_file: str = Field(..., description="Dataset file id: the transfer set (labels optional)")
    validation_file: str | None = Field(None, description="Dataset file id; else validation_split is held out")
    validation_split: float = Field(0.2, gt=0, le=0.9)
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    metadata: dict[str, Any] = Field(default_factory=dict)

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
    inputs: list[list[FiniteFloat]] = Field(..., min_length=1, description="Rows of features, each input_dim long")


class Prediction(BaseModel):
    label: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    predictions: list[Prediction]
