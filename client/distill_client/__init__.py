"""Python client for the distillation service (``pip install ./client``; httpx and pydantic only).

    from distill_client import Distill

    client = Distill()  # DISTILL_API_KEY, DISTILL_BASE_URL (default http://localhost:8000)
    teacher = client.files.create(file="teacher.safetensors", purpose="model")
    data = client.files.create(file="train.csv", purpose="dataset")
    job = client.jobs.create(task="classification", teacher={"file_id": teacher.id},
                             student={"architecture": {"kind": "mlp", "hidden_dims": [32]}},
                             training_file=data.id)
    for event in client.jobs.events(job.id, stream=True):
        print(event.type, event.data)
    client.models.download(client.jobs.retrieve(job.id).result_model_id, "student.safetensors")
"""

from ._client import AsyncDistill, AsyncEventStream, Distill, EventStream
from ._errors import (APIConnectionError, APIError, APIResponseValidationError, APIStatusError, APITimeoutError,
                      AuthenticationError, BadRequestError, ConflictError, DistillError, InternalServerError,
                      JobFailedError, NotFoundError, PayloadTooLargeError, PermissionDeniedError, RateLimitError,
                      UnprocessableEntityError, UnprocessableError)
from ._base import AsyncPage, AsyncPaginator, SyncPage
from ._version import __version__
from .types import (Deleted, Estimate, File, Job, JobError, JobEvent, JobProgress, Model, Prediction, PredictResponse,
                    WebhookDelivery, WebhookEndpoint)

__all__ = ["Distill", "AsyncDistill", "EventStream", "AsyncEventStream", "SyncPage", "AsyncPage", "AsyncPaginator",
           "File", "Job", "JobProgress", "JobError", "JobEvent", "Model", "Prediction", "PredictResponse", "Deleted",
           "Estimate", "WebhookEndpoint", "WebhookDelivery",
           "DistillError", "APIError", "APIStatusError", "APIConnectionError", "APITimeoutError",
           "APIResponseValidationError", "BadRequestError", "AuthenticationError", "PermissionDeniedError",
           "NotFoundError", "ConflictError", "PayloadTooLargeError", "UnprocessableError", "UnprocessableEntityError",
           "RateLimitError", "InternalServerError", "JobFailedError", "__version__"]
