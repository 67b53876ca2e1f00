"""/v1/models: list, get, report, download, delete, and predict.

POST /{model_id}/predict is a hot route (issue 9: 32 concurrent one-row clients). Its
FastAPI endpoint ``predict`` is the reference and handles every case; ``api.hot.HotPaths`` puts
:func:`predict_hot_path` in front of it, which answers a repeat client whose key and model this
process has cached (``api_keys.tenant_of``, ``models.served_model``) without dependency solving
and response-model validation, and hands anything else to the endpoint unchanged.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from ...openapi import HTML, errors
from ...schemas import Deleted, ModelPublic, ModelsPublic, PredictRequest, PredictResponse
from ...services import deletion, report
from ...services import models as service
from ...services.common import page, unix
from ...services.hot_cache import single_flight
from ...tables import ModelRecord
from ..deps import CurrentTenant, SessionDep
from ..hot import cached_request_tenant, is_json
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


async def predict(tenant: CurrentTenant, model_id: ModelId, body: PredictRequest) -> Response:
    """Concurrent requests for one model are micro-batched into one forward (DISTILL_PREDICT_MAX_BATCH
    rows, waiting at most DISTILL_PREDICT_MAX_WAIT_MS); each gets its own rows back, and its own errors.
    503 with Retry-After when DISTILL_PREDICT_MAX_QUEUE requests are already waiting."""
    served = service.served_model(tenant, model_id) or await single_flight(
        ("model", tenant, model_id), run_in_threadpool, service.lookup_served, tenant, model_id)
    return _predictions_response(served, await service.predict_async(served, body.inputs))


def _predictions_response(served: service.Served, predictions: list[dict]) -> Response:
    """The body written once from plain dicts: the response model documents it, and validating our own
    output again cost more than the forward of a small model (issue 9)."""
    try:
        return JSONResponse({"object": "list", "model": served.id, "predictions": predictions})
    except ValueError:  # a NaN from a broken model: the response model's rendering (null), as before
        return Response(PredictResponse(model=served.id, predictions=predictions).model_dump_json(),
                        media_type="application/json")


async def predict_hot_path(request: Request) -> Response | None:
    """The common case of a repeat client, answered before FastAPI solves dependencies: its key and
    its model are in this process's caches (so both were checked in the database moments ago) and its
    body is a valid PredictRequest. Anything else (None) takes the full route (``predict``), which
    answers the same request the same way, or with the documented error; an error of the prediction
    itself (422, 503) is raised here as there. Parsing matches FastAPI's: json.loads, then the model.
    Per request it saves dependency solving, parameter and body validation through FastAPI's machinery
    and the response model: about a quarter of the CPU a one-row prediction cost (profiled with py-spy)."""
    if not is_json(request):
        return None
    tenant = cached_request_tenant(request)
    served = service.served_model(tenant, request.path_params.get("model_id", "")) if tenant else None
    if served is None:
        return None
    raw = await request.body()  # a body too large or a client gone: raised here as in the full route
    try:
        body = PredictRequest.model_validate(json.loads(raw))
    except Exception:  # noqa: BLE001 - invalid in any way (even nested too deep): the full route says how
        return None
    return _predictions_response(served, await service.predict_async(served, body.inputs))


router.add_api_route("/{model_id}/predict", predict, methods=["POST"], response_model=PredictResponse,
                     responses=errors(400, 404, 503))


@router.delete("/{model_id}", response_model=Deleted, responses=errors(404, 409))
def delete_model(session: SessionDep, tenant: CurrentTenant, model_id: ModelId) -> Deleted:
    """Delete a model and its stored weights; 409 while a queued or running job uses it as teacher or student."""
    deletion.delete_model(session, tenant, model_id)
    return Deleted(id=model_id, object="model")
