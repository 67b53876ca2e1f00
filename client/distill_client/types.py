"""Typed results. Lenient on purpose: unknown fields are kept (``extra="allow"``) and most
fields have defaults, so a newer server's additions never break an older client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DistillObject", "File", "Job", "JobProgress", "JobError", "JobEvent", "Estimate", "Model", "Prediction",
           "PredictResponse", "Deleted", "WebhookEndpoint", "WebhookDelivery", "FINAL_STATUSES"]

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class DistillObject(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)


class File(DistillObject):
    id: str
    object: str = "file"
    filename: str = ""
    bytes: int = 0
    sha256: str = ""
    purpose: str = ""
    created_at: int = 0
    details: dict[str, Any] = Field(default_factory=dict)
    kind: str | None = None


class JobProgress(DistillObject):
    epoch: int = 0
    step: int = 0
    total_steps: int = 0


class JobError(DistillObject):
    code: str = "error"
    message: str = ""
    param: str | None = None


class Job(DistillObject):
    id: str
    object: str = "distillation.job"
    status: str
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    progress: JobProgress = Field(default_factory=JobProgress)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    result_model_id: str | None = None
    result_files: list[str] = Field(default_factory=list)
    device: str | None = None
    cancel_requested: bool = False
    queue_position: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


class JobEvent(DistillObject):
    id: int
    object: str = "distillation.job.event"
    created_at: int = 0
    type: str
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        """The job's last event: the stage it ended in (succeeded, failed, cancelled)."""
        return self.type == "stage" and self.data.get("stage") in FINAL_STATUSES


class Estimate(DistillObject):
    """``jobs.estimate``: steps, rows or tokens, FLOPs and a duration; every field the server sends is kept."""

    object: str = "distillation.job.estimate"
    task: str = ""
    method: str = ""
    rows: int | None = None
    tokens: int | None = None
    epochs: int | None = None
    total_steps: int | None = None


class Model(DistillObject):
    id: str
    object: str = "model"
    created_at: int = 0
    created: int | None = None
    owned_by: str | None = None
    job_id: str | None = None
    task: str = ""
    kind: str = "mlp"
    architecture: dict[str, Any] = Field(default_factory=dict)
    parameters: int = 0
    size_bytes: int = 0
    sha256: str = ""
    evaluation: dict[str, Any] = Field(default_factory=dict)


class Prediction(DistillObject):
    label: int
    probabilities: list[float] = Field(default_factory=list)


class PredictResponse(DistillObject):
    object: str = "list"
    model: str = ""
    predictions: list[Prediction] = Field(default_factory=list)


class Deleted(DistillObject):
    id: str
    object: str = ""
    deleted: bool = True


class WebhookEndpoint(DistillObject):
    id: str
    object: str = "webhook_endpoint"
    url: str = ""
    events: list[str] = Field(default_factory=list)
    description: str = ""
    created_at: int = 0
    secret: str | None = Field(None, description="Only in the answer to create: the signing secret")


class WebhookDelivery(DistillObject):
    id: str
    object: str = "webhook_delivery"
    endpoint_id: str = ""
    event_type: str = ""
    job_id: str | None = None
    status: str = ""
    created_at: int = 0
    delivered_at: int | None = None
    next_attempt_at: int | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)
