from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse

from ...openapi import HTML, errors
from ...schemas import Deleted, ModelPublic, ModelsPublic, PredictRequest, PredictResponse
from ...services import deletion, report
from ...services import models as service
from ...services.common import page, unix
from ...tables import ModelRecord
from ..deps import CurrentTenant, SessionDep
from ..params import Cursor, ModelId

router = APIRouter(prefix="/models", tags=["models"])


def public(record: ModelRecord) -> ModelPublic:
    return ModelPublic(id=record.id, created_at=unix(record.created_at), created=unix(record.created_at),
                       owned_by=record.tenant_id or "distill", job_id=record.job_id, task=record.task,
                       architecture=record.architecture, parameters=record.parameters, size_bytes=record.size_bytes,
                       sha256=record.sha256, evaluation=record.evaluation, kind=record.kind)


@router.get("", response_model=ModelsPublic, responses=errors())
def list_models(session: SessionDep, tenant: CurrentTenant, after: Cursor = None,
                limit: Annotated[int, Query()] = 20) -> ModelsPublic:
    rows, has_more = service.list_models(session, tenant, after, limit)
    data = [public(r) for r in rows]
    return ModelsPublic(**page(data, has_more))


@router.get("/{model_id}", response_model=ModelPublic, responses=errors(404))
def get_model(session: SessionDep, tenant: CurrentTenant, model_id: ModelId) -> ModelPublic:
    return public(service.get_model(session, tenant, model_id))


@router.get("/{model_id}/report", response_class=HTMLResponse, responses={200: HTML, **errors(404)})
def model_report(session: SessionDep, tenant: CurrentTenant, model_id: ModelId) -> HTMLResponse:
    """A printable, self-contained HTML report: loss curves (inline SVG), the teacher-vs-student
    evaluation, the exact spec, the lineage (every input's id, filename and sha256), device and duration."""
    return HTMLResponse(report.render(report.gather(session, tenant, model_id)), headers=report.HEADERS)


MODEL_DOWNLOAD = {"description": "A safetensors model file (MLP) or a .tar.gz (transformers models, adapters)",
                  "content": {media: {"schema": {"type": "string", "format": "binary"}}
                              for media in ("application/octet-stream", "application/gzip")}}

DownloadFormat = Annotated[Literal["model", "adapter"], Query(
    description="'model' (default): the student as uploaded teachers are, for a LoRA student with its adapters "
                "merged; 'adapter': a LoRA student's PEFT adapter folder (adapter_config.json, "
                "adapter_model.safetensors) as a .tar.gz")]


@router.get("/{model_id}/download", response_class=FileResponse, responses={200: MODEL_DOWNLOAD, **errors(404)})
def download_model(session: SessionDep, tenant: CurrentTenant, model_id: ModelId,
                   format: DownloadFormat = "model") -> FileResponse:
    """The student in the format a teacher is uploaded in: a model file (MLP), or a .tar.gz of a
    Hugging Face directory that loads with from_pretrained (transformers models); ``format=adapter``:
    a LoRA student's adapter folder as a .tar.gz (404 naming ``format`` for a model without one)."""
    record = service.get_model(session, tenant, model_id)
    path, filename, media_type, sha256 = service.download_file(record, format)
    return FileResponse(path, media_type=media_type, filename=filename, headers={"X-Content-SHA256": sha256})


@router.post("/{model_id}/predict", response_model=PredictResponse, responses=errors(400, 404, 503))
async def predict(session: SessionDep, tenant: CurrentTenant, model_id: ModelId,
                  body: PredictRequest) -> PredictResponse:
    """Concurrent requests for one model are micro-batched into one forward (DISTILL_PREDICT_MAX_BATCH
    rows, waiting at most DISTILL_PREDICT_MAX_WAIT_MS); each gets its own rows back, and its own errors.
    503 with Retry-After when DISTILL_PREDICT_MAX_QUEUE requests are already waiting."""
    def lookup() -> service.Served:
        served = service.Served.of(service.get_model(session, tenant, model_id))
        session.rollback()  # read only: give the connection back while the batch waits
        return served

    served = await run_in_threadpool(lookup)
    return PredictResponse(model=served.id, predictions=await service.predict_async(served, body.inputs))


@router.delete("/{model_id}", response_model=Deleted, responses=errors(404, 409))
def delete_model(session: SessionDep, tenant: CurrentTenant, model_id: ModelId) -> Deleted:
    """Delete a model and its stored weights; 409 while a queued or running job uses it as teacher or student."""
    deletion.delete_model(session, tenant, model_id)
    return Deleted(id=model_id, object="model")
