"""The reconciler every worker runs: a daemon thread that, every ``DISTILL_RECONCILE_INTERVAL_S``,
re-queues jobs whose worker stopped heartbeating and re-publishes queued jobs whose broker
message was lost (:func:`app.services.leases.reconcile`). Every worker runs it (no separate
beat process to deploy or to lose); concurrent passes are safe because each action is a
conditional UPDATE that only one pass wins, and only the winner publishes."""

from __future__ import annotations

import logging
import threading

from app.config import get_settings
from app.db import session_scope
from app.queue import enqueue_job
from app.services import leases

log = logging.getLogger(__name__)
_started = threading.Event()
_stopping = threading.Event()


def reconcile_once() -> list[str]:
    with session_scope() as session:
        ids = leases.reconcile(session, get_settings())
    for job_id in ids:
        enqueue_job(job_id)
    if ids:
        log.info("reconciler published %d job(s): %s", len(ids), ", ".join(ids))
    return ids


def _loop() -> None:
    interval = get_settings().reconcile_interval_s
    while not _stopping.wait(interval):
        try:
            reconcile_once()
        except Exception:  # the database or broker is away: try again next round
            log.warning("reconciler pass failed", exc_info=True)


def start() -> None:
    if not _started.is_set():
        _started.set()
        threading.Thread(target=_loop, name="reconciler", daemon=True).start()


def stop() -> None:
    _stopping.set()
