"""The job lease: how workers take, hold, hand back and finish jobs, and how the
reconciler finds work that was lost. The database is the truth; the broker only says
"job X is ready".

- A claim (queued → running) increments ``attempts``; that number is the worker's lease.
  Every later write of that worker — heartbeat, event, progress, finish, release — is a
  conditional UPDATE fenced on ``attempts`` and ``status = 'running'``: a worker that lost
  its lease (the reaper handed the job on) writes nothing, so a job never runs on two
  workers at once.
- ``heartbeat_at``: for a running job, its worker's last heartbeat; for a queued job, when
  it was last published to the broker.
- Success is decided in one conditional update that a requested cancel wins: a cancel
  answered with 200 always ends ``cancelled``.
- The reconciler (:func:`reconcile`, run by every worker every ``DISTILL_RECONCILE_INTERVAL_S``)
  re-queues running jobs whose heartbeat is older than ``DISTILL_HEARTBEAT_TIMEOUT_S``
  (their worker died) and re-publishes queued jobs nobody claimed for
  ``DISTILL_QUEUED_RESEND_AFTER_S`` (their message was lost). Concurrent reconcilers are
  safe: each action is a conditional UPDATE only one of them wins.
"""

from __future__ import annotations

from datetime import timedelta, timezone

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..config import Settings
from ..tables import Job, JobEvent, utcnow
from . import webhooks
from .jobs import add_event

__all__ = ["LeaseLost", "claim", "renew", "record_event", "set_metrics", "finish", "succeed", "release",
           "reconcile", "RESTARTED"]

RESTARTED = "restarted"
WORKER_LOST = "worker_lost"


class LeaseLost(Exception):
    """This worker no longer holds the job (it was reaped, cancelled or finished elsewhere)."""


def _held(job_id: str, attempt: int):
    return (Job.id == job_id, Job.attempts == attempt, Job.status == "running")


def claim(session: Session, job_id: str, worker: str, device: str) -> Job | None:
    """queued → running with a new lease; None when the job is not queued (running elsewhere,
    finished, cancelled, unknown): a duplicate message is harmless."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
        status="running", worker=worker, device=device, heartbeat_at=now, attempts=Job.attempts + 1,
        started_at=func.coalesce(Job.started_at, now)))
    if result.rowcount == 1:
        webhooks.job_changed(session, job_id)  # job.running, in this transaction
    session.commit()
    if result.rowcount != 1:
        return None
    return session.get(Job, job_id)


def renew(session: Session, job_id: str, attempt: int, progress: dict | None) -> bool:
    """Heartbeat (and progress); returns whether a cancel was requested. LeaseLost if not held."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    if session.execute(update(Job).where(*_held(job_id, attempt)).values(**values)).rowcount != 1:
        raise LeaseLost(job_id)
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_event(session: Session, job_id: str, attempt: int, type: str, message: str, data: dict) -> None:
    if session.execute(update(Job).where(*_held(job_id, attempt)).values(heartbeat_at=utcnow())).rowcount != 1:
        raise LeaseLost(job_id)
    add_event(session, job_id, type, message, data)


def set_metrics(session: Session, job_id: str, attempt: int, metrics: dict, progress: dict | None) -> None:
    values = {"metrics": metrics, **({"progress": progress} if progress is not None else {})}
    if session.execute(update(Job).where(*_held(job_id, attempt)).values(**values)).rowcount != 1:
        raise LeaseLost(job_id)


def finish(session: Session, job_id: str, attempt: int, status: str, error: dict | None = None) -> bool:
    """running → failed | cancelled under this lease; False if the lease was gone."""
    done = session.execute(update(Job).where(*_held(job_id, attempt)).values(
        status=status, finished_at=utcnow(), error=error)).rowcount == 1
    if done:
        message = f"job {status}" + (f": {error['message']}" if error else "")
        add_event(session, job_id, "stage", message, {"stage": status, **({"error": error} if error else {})})
        webhooks.job_changed(session, job_id)
    return done


def succeed(session: Session, job_id: str, attempt: int, metrics: dict, model_id: str,
            result_files: list[str]) -> bool:
    """running → succeeded, unless a cancel was requested first (then False: the caller cancels)."""
    done = session.execute(update(Job).where(*_held(job_id, attempt), Job.cancel_requested.is_(False)).values(
        status="succeeded", finished_at=utcnow(), error=None, metrics=metrics, result_model_id=model_id,
        result_files=result_files)).rowcount == 1
    if done:
        add_event(session, job_id, "stage", "job succeeded", {"stage": "succeeded"})
        webhooks.job_changed(session, job_id)
    return done


def release(session: Session, job_id: str, attempt: int, reason: str) -> bool:
    """running → queued under this lease (a deploy hands the job back); the next worker resumes it."""
    done = session.execute(update(Job).where(*_held(job_id, attempt)).values(
        status="queued", heartbeat_at=utcnow(), worker=None)).rowcount == 1
    if done:
        add_event(session, job_id, RESTARTED, f"job handed back: {reason}", {"reason": reason, "attempt": attempt})
    return done


def _lost_workers(session: Session, job_id: str) -> int:
    """How many times this job's worker has died (restarts for other reasons don't count)."""
    rows = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == RESTARTED))
    return sum(1 for data in rows if (data or {}).get("reason") == WORKER_LOST)


def _reap(session: Session, job: Job, settings: Settings, now) -> bool:
    """A running job whose worker stopped heartbeating: cancel, fail or re-queue it. True when re-queued."""
    stale = (Job.id == job.id, Job.status == "running", Job.attempts == job.attempts,
             Job.heartbeat_at == job.heartbeat_at)
    last = job.heartbeat_at
    if last is not None and last.tzinfo is None:  # SQLite hands datetimes back without a zone (stored UTC)
        last = last.replace(tzinfo=timezone.utc)
    seconds = (now - last).total_seconds() if last is not None else 0.0
    if job.cancel_requested:
        status, error = "cancelled", None
    elif _lost_workers(session, job.id) + 1 >= settings.max_job_attempts:
        status = "failed"
        error = {"code": WORKER_LOST, "param": None,
                 "message": f"the job's worker died {settings.max_job_attempts} times; giving up"}
    else:
        if session.execute(update(Job).where(*stale).values(status="queued", heartbeat_at=now,
                                                            worker=None)).rowcount != 1:
            return False
        add_event(session, job.id, RESTARTED, f"worker {job.worker} lost (no heartbeat for {seconds:.0f}s); re-queued",
               {"reason": WORKER_LOST, "worker": job.worker, "attempt": job.attempts, "silent_s": seconds})
        return True
    if session.execute(update(Job).where(*stale).values(status=status, finished_at=now, error=error)).rowcount == 1:
        add_event(session, job.id, "stage", f"job {status}" + (f": {error['message']}" if error else " (its worker was lost)"),
               {"stage": status, **({"error": error} if error else {})})
        webhooks.job_changed(session, job.id)
    return False


def reconcile(session: Session, settings: Settings) -> list[str]:
    """One pass; returns the ids to publish to the broker (the caller publishes after commit)."""
    now = utcnow()
    publish: list[str] = []
    dead_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    for job in session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < dead_before)).all():
        if _reap(session, job, settings, now):
            publish.append(job.id)
    resend_before = now - timedelta(seconds=settings.queued_resend_after_s)
    queued = session.execute(select(Job.id, Job.heartbeat_at).where(
        Job.status == "queued", (Job.heartbeat_at < resend_before) | Job.heartbeat_at.is_(None))).all()
    for job_id, published_at in queued:
        condition = Job.heartbeat_at.is_(None) if published_at is None else Job.heartbeat_at == published_at
        if session.execute(update(Job).where(Job.id == job_id, Job.status == "queued", condition)
                           .values(heartbeat_at=now)).rowcount == 1:
            publish.append(job_id)
    session.commit()
    return publish
