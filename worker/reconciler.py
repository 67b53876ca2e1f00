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
from app.services.webhooks import republish_due
from app.services import leases, readiness

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
    republish_due()  # webhook retries whose backoff has passed, and deliveries whose message was lost
    return ids


def _loop() -> None:
    interval = get_settings().reconcile_interval_s
    while not _stopping.wait(interval):
        try:
            reconcile_once()
        except Exception:  # the database or broker is away: try again next round
            log.warning("reconciler pass failed", exc_info=True)


def _beat_loop() -> None:
    """This worker's liveness heartbeat for /readyz and the "no worker" events (app.services.readiness),
    a few times per heartbeat timeout, independent of how long a reconciler pass takes."""
    settings = get_settings()
    interval = max(0.2, min(settings.reconcile_interval_s, settings.heartbeat_timeout_s / 3))
    while not _stopping.is_set():
        try:
            readiness.beat()
        except Exception:  # the broker is away: readyz will say so
            log.warning("worker heartbeat failed", exc_info=True)
        _stopping.wait(interval)


def start() -> None:
    if not _started.is_set():
        _started.set()
        threading.Thread(target=_loop, name="reconciler", daemon=True).start()
        threading.Thread(target=_beat_loop, name="worker-heartbeat", daemon=True).start()


def stop() -> None:
    _stopping.set()
    readiness.forget()  # a clean shutdown is missing from /readyz at once
