"""Per-tenant limits: queued + running jobs (429) and bytes of stored files (413).

Each check runs under a per-tenant lock on PostgreSQL (a transaction-level advisory lock,
released at the transaction's end), so two requests that race can't both take the last
slot: the second counts after the first has committed. SQLite (the single-machine
default) runs one writer at a time and takes no lock here.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..config import get_settings
from ..errors import PayloadTooLarge
from ..errors import TooManyRequests
from ..tables import FileRecord, Job

__all__ = ["check_running_jobs", "check_storage", "stored_bytes"]

ACTIVE = ("queued", "running")
JOBS_RETRY_AFTER_S = 30  # jobs run for minutes: a client that waits this long and retries is not hammering


def _lock_tenant(session: Session, tenant: str, resource: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.sha256(f"{resource}:{tenant}".encode()).digest()
        session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True))))


def check_running_jobs(session: Session, tenant: str) -> None:
    """429 if the tenant already has its limit of queued + running jobs (the lock is held until the
    request's transaction commits the new job)."""
    limit = get_settings().tenant_max_running_jobs
    _lock_tenant(session, tenant, "jobs")
    active = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant,
                                                                        Job.status.in_(ACTIVE)))
    if active >= limit:
        raise TooManyRequests(f"this tenant has {active} queued or running jobs; the limit is {limit} "
                              "(DISTILL_TENANT_MAX_RUNNING_JOBS): wait for one to finish or cancel one",
                              code="too_many_running_jobs", limit=limit,
                              headers={"Retry-After": str(JOBS_RETRY_AFTER_S)})


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
