from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

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
from ..deps import CurrentTenant, IdempotencyKeyHeader, RequestSha256, SessionDep
from ..params import Cursor, JobId

router = APIRouter(prefix="/distillation/jobs", tags=["distillation jobs"])


public = job_public


def public_event(event: JobEvent) -> JobEventPublic:
    return JobEventPublic(id=event.id, created_at=unix(event.created_at), type=event.type, message=event.message,
                          data=event.data)


@router.post("", status_code=201, response_model=JobPublic, responses=errors(400, 409, 429, 503))
async def create_job(session: SessionDep, tenant: CurrentTenant, body: JobCreate, request_sha256: RequestSha256,
                     idempotency_key: IdempotencyKeyHeader = None) -> JobPublic:
    """Submit a job; it is checked against its files now and queued for a worker. 429 when the tenant
    already has DISTILL_TENANT_MAX_RUNNING_JOBS queued or running; ``Idempotency-Key`` makes retries safe."""
    # The database work runs in worker threads; waiting for the tenant's batch (services.jobs.submit_job)
    # holds no thread, so a burst of submits leaves the thread pool to the reads.
    if idempotency_key is not None:
        earlier = await run_in_threadpool(idempotency.claim, session, tenant, idempotency_key, request_sha256)
        if earlier is not None:
            return earlier
    try:
        job = await run_in_threadpool(service.prepare_job, session, tenant, body)
        return await service.submit_job(job, idempotency_key)
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


@router.get("/{job_id}", response_model=JobPublic, responses=errors(404))
def get_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    job, position = service.get_job_with_position(session, tenant, job_id)  # one query
    session.close()  # a read: ended here, in this thread, so the session dependency has nothing left to do
    return public(job, position)


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
