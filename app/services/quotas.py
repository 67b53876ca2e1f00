"""Per-tenant limits: queued + running jobs (429) and bytes of stored files (413).

Each check runs under a per-tenant lock on PostgreSQL (a transaction-level advisory lock,
released at the transaction's end), so two requests that race can't both take the last
slot: the second counts after the first has committed. SQLite (the single-machine
default) runs one writer at a time and takes no lock here.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from ..config import get_settings
from ..errors import PayloadTooLarge
from ..errors import TooManyRequests
from ..tables import FileRecord, Job

__all__ = ["check_running_jobs", "lock_and_count_running_jobs", "too_many_running_jobs", "check_storage",
           "stored_bytes"]

ACTIVE = ("queued", "running")
JOBS_RETRY_AFTER_S = 30  # jobs run for minutes: a client that waits this long and retries is not hammering


def _lock_key(tenant: str, resource: str) -> int:
    digest = hashlib.sha256(f"{resource}:{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_tenant(session: Session, tenant: str, resource: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_lock_key(tenant, resource))))


def _active_jobs(session: Session, tenant: str, cap: int | None = None) -> int:
    """The tenant's queued + running jobs, counted up to ``cap`` (an index range on (tenant_id, status),
    cut off once the answer is known)."""
    active = select(Job.id).where(Job.tenant_id == tenant, Job.status.in_(ACTIVE))
    if cap is not None:
        active = active.limit(cap)
    return session.scalar(select(func.count()).select_from(active.subquery()))


def lock_and_count_running_jobs(session: Session, tenant: str, extra: int = 0,
                                position_of: tuple | None = None) -> tuple[int, int | None]:
    """Take the tenant's job-quota lock (held until the transaction ends) and count its queued +
    running jobs, up to the limit + ``extra`` (the transaction's own new jobs, which it sees); with
    ``position_of`` = (created_at, id), also the place in the queue of that job (how many queued jobs,
    of any tenant, were created before it or with it). On PostgreSQL one round trip: the lock and the
    counts go as one simple query of two statements; the counts, a statement of their own, read a
    snapshot taken after the lock was granted, so they see every job committed by whoever held the
    lock before."""
    cap = get_settings().tenant_max_running_jobs + extra
    if session.get_bind().dialect.name != "postgresql":
        position = None
        if position_of is not None:
            position = session.scalar(select(func.count()).select_from(Job).where(
                Job.status == "queued", tuple_(Job.created_at, Job.id) <= tuple_(*position_of)))
        return _active_jobs(session, tenant, cap=cap), position
    statuses = ", ".join(f"'{status}'" for status in ACTIVE)  # constants, not input
    place = "NULL" if position_of is None else \
        "(SELECT count(*) FROM jobs WHERE status = 'queued' AND (created_at, id) <= (%(created_at)s, %(id)s))"
    row = session.connection().exec_driver_sql(
        "SELECT pg_advisory_xact_lock(%(lock)s); SELECT (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = "
        f"%(tenant)s AND status IN ({statuses}) LIMIT %(cap)s) AS active), {place}",
        {"lock": _lock_key(tenant, "jobs"), "tenant": tenant, "cap": cap,
         "created_at": position_of[0] if position_of else None, "id": position_of[1] if position_of else None}).one()
    return row[0], row[1]


def too_many_running_jobs(active: int) -> TooManyRequests:
    """The 429 of a submit past the tenant's limit of queued + running jobs."""
    limit = get_settings().tenant_max_running_jobs
    return TooManyRequests(f"this tenant has {active} queued or running jobs; the limit is {limit} "
                           "(DISTILL_TENANT_MAX_RUNNING_JOBS): wait for one to finish or cancel one",
                           code="too_many_running_jobs", limit=limit, headers={"Retry-After": str(JOBS_RETRY_AFTER_S)})


def check_running_jobs(session: Session, tenant: str) -> None:
    """429 if the tenant already has its limit of queued + running jobs (the lock is held until the
    request's transaction commits the new job)."""
    active, _ = lock_and_count_running_jobs(session, tenant)
    if active >= get_settings().tenant_max_running_jobs:
        raise too_many_running_jobs(_active_jobs(session, tenant))


def stored_bytes(session: Session, tenant: str) -> int:
    return session.scalar(select(func.coalesce(func.sum(FileRecord.bytes), 0))
                          .where(FileRecord.tenant_id == tenant)) or 0


def check_storage(session: Session, tenant: str, incoming: int = 0, lock: bool = True) -> None:
    """413 if the tenant's stored files plus ``incoming`` bytes exceed the limit. Before an upload is
    kept: its size, without the lock (a cheap early answer; validating an upload takes long and must
    not hold the tenant's other uploads up). After it was added (flushed, not yet committed): 0, under
    the lock until the request commits, so racing uploads are counted one after the other."""
    limit = get_settings().tenant_max_storage_bytes
    if lock:
        _lock_tenant(session, tenant, "storage")
    total = stored_bytes(session, tenant) + incoming
    if total > limit:
        raise PayloadTooLarge(f"this upload would take the tenant's stored files to {total} bytes; the limit is "
                              f"{limit} bytes (DISTILL_TENANT_MAX_STORAGE_BYTES): delete files to make room",
                              param="file", code="storage_limit_exceeded", limit=limit)
