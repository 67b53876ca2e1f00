from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from ...schemas import Deleted, JobCreate, JobEventPublic, JobEventsPublic, JobPublic, JobsPublic, JobStatus
from ...services import idempotency, quotas
from ...services import deletion
from ...services import jobs as service
from ...services.common import page, unix
from ...services.event_stream import stream_events
from ...tables import Job, JobEvent
from ..deps import CurrentTenant, IdempotencyKeyHeader, RequestSha256, SessionDep
from ..params import Cursor, JobId

router = APIRouter(prefix="/distillation/jobs", tags=["distillation jobs"])


def public(job: Job) -> JobPublic:
    return JobPublic(id=job.id, status=job.status, created_at=unix(job.created_at), started_at=unix(job.started_at),
                     finished_at=unix(job.finished_at), spec=job.spec, progress=job.progress or {},
                     metrics=job.metrics or {}, error=job.error, result_model_id=job.result_model_id,
                     result_files=job.result_files or [], device=job.device, cancel_requested=job.cancel_requested)


def public_event(event: JobEvent) -> JobEventPublic:
    return JobEventPublic(id=event.id, created_at=unix(event.created_at), type=event.type, message=event.message,
                          data=event.data)


@router.post("", status_code=201, response_model=JobPublic)
def create_job(session: SessionDep, tenant: CurrentTenant, body: JobCreate, request_sha256: RequestSha256,
               idempotency_key: IdempotencyKeyHeader = None) -> JobPublic:
    """Submit a job; it is checked against its files now and queued for a worker. 429 when the tenant
    already has DISTILL_TENANT_MAX_RUNNING_JOBS queued or running; ``Idempotency-Key`` makes retries safe."""

    def create() -> JobPublic:
        quotas.check_running_jobs(session, tenant)
        return public(service.create_job(session, tenant, body))

    return idempotency.run(session, tenant, idempotency_key, request_sha256, 201, create)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, tenant: CurrentTenant, status: JobStatus | None = None, after: Cursor = None,
              limit: Annotated[int, Query()] = 20) -> JobsPublic:
    rows, has_more = service.list_jobs(session, tenant, status, after, limit)
    data = [public(j) for j in rows]
    return JobsPublic(**page(data, has_more))


@router.get("/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    return public(service.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    """A queued job is cancelled at once; a running one stops cooperatively within seconds."""
    return public(service.cancel_job(session, tenant, job_id))


EVENT_STREAM_DOC = {200: {"content": {"text/event-stream": {
    "schema": {"type": "string"},
    "example": 'id: 12\nevent: stage\ndata: {"id":12,"type":"stage","data":{"stage":"training"}}\n\n'}}}}


@router.get("/{job_id}/events", response_model=JobEventsPublic, responses=EVENT_STREAM_DOC)
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


@router.delete("/{job_id}", response_model=Deleted)
def delete_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> Deleted:
    """Delete a finished job with its events and work folder (409 while queued or running); its model stays."""
    deletion.delete_job(session, tenant, job_id)
    return Deleted(id=job_id, object="distillation.job")
