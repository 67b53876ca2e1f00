"""Helpers shared by the services: timestamps and cursor pagination."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from ..errors import Unprocessable
from ..schemas import ID_PATTERN, JobPublic

MAX_PAGE = 100
_ID = re.compile(ID_PATTERN)


def is_id(value: object) -> bool:
    """Whether ``value`` has the shape of an id this service mints. Lookups check it before querying:
    PostgreSQL refuses a NUL byte in a string (a 500), and a 10 kB "id" is never one of ours."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def shown_id(value: str) -> str:
    """An id quoted in an error message, cut short: the message never echoes kilobytes back."""
    return repr(value) if len(value) <= 80 else repr(value[:80]) + "..."


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def paginate(session: Session, table, query: Select, after: str | None, limit: int,
             tenant: str) -> tuple[list, bool]:
    """Newest first; ``after`` is the id of the last item of the previous page. Given ``tenant``, an
    ``after`` of another tenant's item is refused like an unknown one (it would tell that it exists)."""
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit must be in [1, {MAX_PAGE}]", param="limit")
    if after is not None:
        anchor_query = select(table.created_at, table.id).where(table.id == after)
        anchor_query = anchor_query.where(table.tenant_id == tenant)
        anchor = session.execute(anchor_query).first() if is_id(after) else None
        if anchor is None:
            raise Unprocessable(f"no item with id {shown_id(after)} to page after", param="after")
        query = query.where(or_(table.created_at < anchor.created_at,
                                and_(table.created_at == anchor.created_at, table.id < anchor.id)))
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


def page(data: list, has_more: bool) -> dict:
    """The list envelope's fields for a page of public objects (newest first)."""
    return {"data": data, "has_more": has_more, "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None}


def job_public(job, queue_position: int | None = None) -> JobPublic:
    """A job as the API shows it (GET /v1/distillation/jobs/{id}, webhook payloads): ``queue_position``
    only while queued."""
    return JobPublic(id=job.id, status=job.status, created_at=unix(job.created_at), started_at=unix(job.started_at),
                     finished_at=unix(job.finished_at), spec=job.spec, progress=job.progress or {},
                     metrics=job.metrics or {}, error=job.error, result_model_id=job.result_model_id,
                     result_files=job.result_files or [], device=job.device, cancel_requested=job.cancel_requested,
                     queue_position=queue_position if job.status == "queued" else None)
