"""Helpers shared by the services: timestamps and cursor pagination."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from ..errors import Unprocessable

MAX_PAGE = 100


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def paginate(session: Session, table, query: Select, after: str | None, limit: int) -> tuple[list, bool]:
    """Newest first; ``after`` is the id of the last item of the previous page."""
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit must be in [1, {MAX_PAGE}]", param="limit")
    if after is not None:
        anchor = session.execute(select(table.created_at, table.id).where(table.id == after)).first()
        if anchor is None:
            raise Unprocessable(f"no item with id {after!r} to page after", param="after")
        query = query.where(or_(table.created_at < anchor.created_at,
                                and_(table.created_at == anchor.created_at, table.id < anchor.id)))
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


def page(data: list, has_more: bool) -> dict:
    """The list envelope's fields for a page of public objects (newest first)."""
    return {"data": data, "has_more": has_more, "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None}
