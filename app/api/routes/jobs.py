from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from ...openapi import errors, event_stream
from ...schemas import (Deleted, EstimatePublic, JobCreate, JobEventPublic, JobEventsPublic, JobPublic, JobsPublic,
                        JobStatus)
from ...services import estimate as estimates
from ...services import idempotency
from ...services import deletion
from ...services import jobs as service
from ...services.common import job_public, page, unix
from ...services.event_stream import stream_events
from ...tables import JobEvent
from ...errors import NotFound
from ..deps import CurrentTenant, IdempotencyKeyHeader, RequestSha256, SessionDep
from ..hot import cached_request_tenant, is_json
from ..params import Cursor, JobId

router = APIRouter(prefix="/distillation/jobs", tags=["distillation jobs"])


public = job_public


def public_event(event: JobEvent) -> JobEventPublic:
    return JobEventPublic(id=event.id, created_at=unix(event.created_at), type=event.type, message=event.message,
                          data=event.data)


def job_response(job: JobPublic, status_code: int = 200) -> Response:
    """A job's JSON, written once: validating our own JobPublic again as the response model (what
    FastAPI does with a returned model) cost a tenth of a GET's CPU (issue 9). Same bytes."""
    return Response(job.model_dump_json(), status_code=status_code, media_type="application/json")


async def create_job_hot_path(request: Request) -> Response | None:
    """A submit from a client whose API key this process has cached, without an Idempotency-Key (a keyed
    submit takes the full route, which claims the key), whose body is a valid JobCreate; anything else
    goes to :func:`create_job`, which answers it the same way or with the documented error. Checked
    and queued like there: on the event loop when the check needs no I/O, else in a worker thread (a
    422 or 429 raised here, as there), then the tenant's next batch."""
    if not is_json(request) or idempotency.HEADER in request.headers:
        return None
    tenant = cached_request_tenant(request)
    if tenant is None:
        return None
    raw = await request.body()  # a body too large or a client gone: raised here as in the full route
    try:
        body = JobCreate.model_validate(json.loads(raw))  # as FastAPI parses a body: json.loads, then the model
    except Exception:  # noqa: BLE001 - invalid in any way: the full route's 422 names the field
        return None
    job = service.prepare_without_io(tenant, body) or await run_in_threadpool(service.prepare_new_job, tenant, body)
    return job_response(await service.submit_job(job, None), 201)


@router.post("", status_code=201, response_model=JobPublic, responses=errors(400, 409, 429, 503))
async def create_job(session: SessionDep, tenant: CurrentTenant, body: JobCreate, request_sha256: RequestSha256,
                     idempotency_key: IdempotencyKeyHeader = None) -> Response:
    """Submit a job; it is checked against its files now and queued for a worker. 429 when the tenant
    already has DISTILL_TENANT_MAX_RUNNING_JOBS queued or running; ``Idempotency-Key`` makes retries safe."""
    # The database work runs in worker threads; waiting for the tenant's batch (services.jobs.submit_job)
    # holds no thread, so a burst of submits leaves the thread pool to the reads.
    if idempotency_key is not None:
        earlier = await run_in_threadpool(idempotency.claim, session, tenant, idempotency_key, request_sha256)
        if earlier is not None:
            return earlier
    try:
        job = service.prepare_without_io(tenant, body) or \
            await run_in_threadpool(service.prepare_job, session, tenant, body)
        return job_response(await service.submit_job(job, idempotency_key), 201)
    except Exception:  # not on cancellation: a job its batch still commits keeps its key (and its replay)
        if idempotency_key is not None:
            await run_in_threadpool(idempotency.forget, session, tenant, idempotency_key)
        raise


@router.post("/estimate", response_model=EstimatePublic, responses=errors(400))
def estimate_job(session: SessionDep, tenant: CurrentTenant, body: JobCreate) -> EstimatePublic:
    """What the job would cost: optimizer steps, rows and tokens, teacher and student FLOPs and an estimated
    duration on the workers' device. Checked like a submit (422 naming the field); nothing is queued."""
    return estimates.estimate(session, tenant, body)


@router.get("", response_model=JobsPublic, responses=errors())
def list_jobs(session: SessionDep, tenant: CurrentTenant, status: JobStatus | None = None, after: Cursor = None,
              limit: Annotated[int, Query()] = 20) -> JobsPublic:
    rows, has_more = service.list_jobs(session, tenant, status, after, limit)
    positions = service.queue_positions(session, [j.id for j in rows if j.status == "queued"])
    data = [public(j, positions.get(j.id)) for j in rows]
    return JobsPublic(**page(data, has_more))


async def get_job_hot_path(request: Request) -> Response | None:
    """A GET from a client whose API key this process has cached; anything else (and a job not found)
    goes to :func:`get_job`, which answers it the same way or with the documented error."""
    tenant = cached_request_tenant(request)
    if tenant is None:
        return None
    try:
        job, position = await run_in_threadpool(service.read_job_with_position, tenant, request.path_params["job_id"])
    except NotFound:
        return None
    return job_response(public(job, position))


@router.get("/{job_id}", response_model=JobPublic, responses=errors(404))
async def get_job(tenant: CurrentTenant, job_id: JobId) -> Response:
    job, position = await run_in_threadpool(service.read_job_with_position, tenant, job_id)  # one round trip
    return job_response(public(job, position))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=errors(404, 409))
def cancel_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    """A queued job is cancelled at once; a running one stops cooperatively within seconds."""
    return public(service.cancel_job(session, tenant, job_id))


EVENT_STREAM_DOC = {200: event_stream(
    "JobEventPublic", 'id: 12\nevent: stage\ndata: {"id":12,"type":"stage","data":{"stage":"training"}}\n\n',
    "The events; with stream=true, Server-Sent Events (each data a JobEventPublic) until the final stage")}


@router.get("/{job_id}/events", response_model=JobEventsPublic, responses={**EVENT_STREAM_DOC, **errors(404)})
def list_events(session: SessionDep, tenant: CurrentTenant, job_id: JobId,
                after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                stream: Annotated[bool, Query(description="Server-Sent Events until the job's final stage")] = False,
                last_event_id: Annotated[int | None, Header(ge=0, le=2**62)] = None):
    """Events oldest first; pass the last seen ``id`` as ``after`` to read only newer ones. With
    ``stream=true`` the same rows as ``text/event-stream``, live, ending after the final stage;
    a reconnecting client sends ``Last-Event-ID``."""
    if stream:
        service.get_job(session, tenant, job_id)  # 404 before any byte is streamed
        cursor = last_event_id if last_event_id is not None else after
        return StreamingResponse(stream_events(job_id, cursor), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    rows, has_more = service.list_events(session, tenant, job_id, after, limit)
    return JobEventsPublic(data=[public_event(e) for e in rows], has_more=has_more)


@router.delete("/{job_id}", response_model=Deleted, responses=errors(404, 409))
def delete_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> Deleted:
    """Delete a finished job with its events and work folder (409 while queued or running); its model stays."""
    deletion.delete_job(session, tenant, job_id)
    return Deleted(id=job_id, object="distillation.job")
