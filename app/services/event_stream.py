"""Job events as Server-Sent Events: the same rows the paged list reads, oldest first.

Each event is one SSE message (``id`` = the event row's id, ``event`` = its type, ``data``
= the event object as JSON). A client that reconnects sends ``Last-Event-ID`` and gets only
newer rows. While nothing happens a comment line (``: keep-alive``) goes out every
``DISTILL_SSE_KEEPALIVE_S`` so proxies keep the connection. The stream ends after the job's
final stage (succeeded, failed, cancelled), or after ``DISTILL_SSE_MAX_SECONDS`` (the client
reconnects with Last-Event-ID).

A plain generator: Starlette runs it in a worker thread, so the polling never blocks the
event loop; each poll uses a short database session of its own.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

from sqlalchemy import select

from ..config import get_settings
from ..db import session_scope
from ..tables import Job, JobEvent
from .common import unix

FINAL_STAGES = ("succeeded", "failed", "cancelled")
POLL_S = 0.5
BATCH = 200


def _message(event: JobEvent) -> str:
    body = {"id": event.id, "object": "distillation.job.event", "created_at": unix(event.created_at),
            "type": event.type, "message": event.message, "data": event.data}
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def _is_final(event: JobEvent) -> bool:
    return event.type == "stage" and (event.data or {}).get("stage") in FINAL_STAGES


def stream_events(job_id: str, after: int | None) -> Iterator[str]:
    settings = get_settings()
    cursor = after or 0
    started = last_sent = time.monotonic()
    yield f"retry: {int(POLL_S * 4000)}\n\n"  # how long a client waits before reconnecting, ms
    while time.monotonic() - started < settings.sse_max_seconds:
        with session_scope() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > cursor)
                                   .order_by(JobEvent.id).limit(BATCH)).all()
            status = session.scalar(select(Job.status).where(Job.id == job_id)) if not rows else None
            messages = [(_message(row), row.id, _is_final(row)) for row in rows]
        for text, event_id, final in messages:
            yield text
            cursor, last_sent = event_id, time.monotonic()
            if final:
                return
        if not messages:
            if status is None or status in FINAL_STAGES:  # deleted, or finished before this cursor
                return
            if time.monotonic() - last_sent >= settings.sse_keepalive_s:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            time.sleep(POLL_S)
        elif len(messages) < BATCH:
            time.sleep(POLL_S)
