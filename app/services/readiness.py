"""Readiness: is the service able to run a job right now, and if not, what is missing.

Three checks, each cheap, each naming the fix when it fails (``GET /readyz``):

- ``database``: the schema is at Alembic's head (``alembic_version`` against the migration
  scripts' head revision). A request that hits a table or column the database doesn't have
  yet is answered 503 "run ``alembic upgrade head``" (:func:`database_error_response`), not 500.
- ``broker``: the broker answers (a Redis PING; for the embedded filesystem broker, its queue
  folder is there and writable; any other broker, a kombu connection).
- ``workers``: at least one worker consuming this queue is alive. Each worker writes a
  heartbeat every few seconds (:func:`beat`, from the worker's reconciler thread): a key
  with a time-to-live of ``DISTILL_HEARTBEAT_TIMEOUT_S`` in the broker's Redis, or, with the
  filesystem broker, a file under ``var/broker/workers/<queue>/`` whose mtime is the beat.
  A worker that stops (or dies) is missing within the heartbeat timeout; one that shuts down
  cleanly removes its heartbeat at once.

Waiting jobs are told when no worker is around: a light daemon thread in each API process
(:func:`start_watcher`, started with the app) looks every few seconds; once no worker has been
seen for ``DISTILL_HEARTBEAT_TIMEOUT_S`` (default 60 s), every queued job gets one ``warning``
event per outage (an outage is named by the last heartbeat seen before it), however often it
looks and however many API processes look.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from functools import lru_cache
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text

from ..config import Settings, get_settings

log = logging.getLogger(__name__)



class ReadinessCheck(BaseModel):
    """One check: ``ok``, and in ``detail`` what was found or what is missing and how to fix it."""

    model_config = ConfigDict(extra="allow")
    ok: bool
    detail: str


class ReadinessPublic(BaseModel):
    """``GET /readyz``: 200 with status ready, or 503 with status not_ready; every check says why."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, ReadinessCheck] = Field(description="database (schema at Alembic head), broker (answers), "
                                                          "workers (at least one alive on this queue)")


ROOT = Path(__file__).resolve().parents[2]
UPGRADE_HINT = "run `alembic upgrade head` (with the service's DISTILL_DATABASE_URL) and retry"
NO_WORKER_REASON = "no_worker"


# --------------------------------------------------------------------------- database schema

@lru_cache
def head_revisions() -> tuple[str, ...]:
    """The migration scripts' head revision(s), read once from migrations/ via alembic.ini."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(ROOT / "alembic.ini"))
    return tuple(sorted(ScriptDirectory.from_config(config).get_heads()))


def check_database() -> dict:
    """{"ok", "detail", "revision", "head"}: the schema is at head, or what to do about it."""
    from ..db import get_engine

    try:
        heads = head_revisions()
    except Exception as exc:  # migrations/ missing from this installation: can't compare
        heads = ()
        log.warning("cannot read the migration scripts' head: %s", exc)
    try:
        with get_engine().connect() as connection:
            try:
                rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            except sa_exc.DBAPIError as exc:
                if not _is_missing_schema(exc):
                    raise
                return {"ok": False, "revision": None, "head": ",".join(heads) or None,
                        "detail": f"the database has no schema (no alembic_version table): {UPGRADE_HINT}"}
    except sa_exc.DBAPIError as exc:
        return {"ok": False, "revision": None, "head": ",".join(heads) or None,
                "detail": f"the database does not answer ({_first_line(exc)}); check DISTILL_DATABASE_URL "
                          "and that the database server is running"}
    current = tuple(sorted(rows))
    found, head = ",".join(current) or None, ",".join(heads) or None
    if not heads or current == heads:
        return {"ok": True, "revision": found, "head": head, "detail": f"schema at head {found}"}
    if not current:
        detail = f"the database's schema has no revision; the code needs {head}: {UPGRADE_HINT}"
    elif set(current) - _known_revisions():
        detail = (f"the database is at revision {found}, which these migration scripts don't know (a newer "
                  f"release migrated it?); the code needs {head}: deploy the matching code or downgrade")
    else:
        detail = f"the database is at revision {found} but the code needs {head}: {UPGRADE_HINT}"
    return {"ok": False, "revision": found, "head": head, "detail": detail}


@lru_cache
def _known_revisions() -> frozenset[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    return frozenset(revision.revision for revision in script.walk_revisions())


def _first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


MISSING_MARKERS = ("no such table", "no such column", "does not exist", "undefinedtable", "undefinedcolumn",
                   "has no column named")


def _is_missing_schema(exc: BaseException) -> bool:
    """A table or column the code expects is not in the database (SQLite or PostgreSQL wording)."""
    orig = getattr(exc, "orig", None)
    names = f"{type(orig).__name__} {orig}".lower()
    return any(marker in names for marker in MISSING_MARKERS)


def database_error_response(request, exc: sa_exc.DBAPIError):
    """Exception handler for SQLAlchemy DBAPI errors on any route: a schema that isn't at head is a
    503 saying to run ``alembic upgrade head``; an unreachable database a 503 saying so; anything
    else is still the 500 it was (a bug)."""
    from ..errors import problem_response

    path = request.url.path
    if _is_missing_schema(exc) or isinstance(exc, sa_exc.ProgrammingError | sa_exc.OperationalError):
        database = check_database()
        if not database["ok"]:
            log.warning("request on %s against a database that is not ready: %s", path, database["detail"])
            return _not_ready(path, database["detail"])
    if (isinstance(exc, sa_exc.OperationalError) and exc.connection_invalidated) or \
            isinstance(exc, sa_exc.InterfaceError):
        return _not_ready(path, f"the database is unavailable ({_first_line(exc)}); retry shortly")
    log.error("unhandled database error on %s", path, exc_info=exc)
    return problem_response(500, "internal_error", "internal server error (this is a bug)", path)


def _not_ready(path: str, detail: str):
    from ..errors import problem_response

    response = problem_response(503, "database_not_ready", detail, path)
    response.headers["Retry-After"] = "30"
    return response


# --------------------------------------------------------------------------- broker

def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "redis+socket://"))


def _redis(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)


def check_broker(settings: Settings | None = None) -> dict:
    settings = settings or get_settings()
    url = settings.broker_url
    try:
        if _is_redis(url):
            _redis(settings).ping()
            return {"ok": True, "detail": "redis answers PING"}
        if url.startswith("filesystem://"):
            folder = settings.broker_dir / "queue"
            try:  # what the API's first publish would do (app.queue.celery_config)
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                return {"ok": False, "detail": f"the filesystem broker's folder {folder} is missing or not writable; "
                                               "start the API or a worker once to create it, or fix its permissions"}
            return {"ok": True, "detail": "filesystem broker folder writable"}
        from kombu import Connection

        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        return {"ok": True, "detail": "broker connection made"}
    except Exception as exc:
        return {"ok": False, "detail": f"the broker at DISTILL_BROKER_URL does not answer ({_first_line(exc)}); "
                                       "start it or fix the URL"}


# --------------------------------------------------------------------------- worker heartbeats

def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _redis_prefix(settings: Settings) -> str:
    return f"distill:workers:{settings.queue}:"


def _heartbeat_dir(settings: Settings) -> Path:
    return settings.broker_dir / "workers" / settings.queue


def beat(settings: Settings | None = None, name: str | None = None) -> None:
    """This worker is alive (called every few seconds from the worker's reconciler thread)."""
    settings = settings or get_settings()
    name, now = name or worker_name(), time.time()
    ttl = max(1, int(round(settings.heartbeat_timeout_s)))
    if _is_redis(settings.broker_url):
        client, prefix = _redis(settings), _redis_prefix(settings)
        pipe = client.pipeline()
        pipe.set(prefix + "alive:" + name, repr(now), ex=ttl)
        pipe.set(prefix + "last_seen", repr(now), ex=7 * 24 * 3600)
        pipe.execute()
    elif settings.broker_url.startswith("filesystem://"):
        folder = _heartbeat_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        for file in (folder / f"alive-{name.replace('/', '_')}", folder / "last_seen"):
            file.touch()
            os.utime(file, (now, now))


def forget(settings: Settings | None = None, name: str | None = None) -> None:
    """A worker shutting down cleanly: it is gone now, not a heartbeat timeout from now."""
    settings = settings or get_settings()
    name = name or worker_name()
    try:
        if _is_redis(settings.broker_url):
            _redis(settings).delete(_redis_prefix(settings) + "alive:" + name)
        elif settings.broker_url.startswith("filesystem://"):
            (_heartbeat_dir(settings) / f"alive-{name.replace('/', '_')}").unlink(missing_ok=True)
    except Exception:
        log.warning("could not remove this worker's heartbeat", exc_info=True)


def worker_status(settings: Settings | None = None) -> dict:
    """{"alive": [worker names], "last_seen": unix time of the newest heartbeat or None, "method"}."""
    settings = settings or get_settings()
    timeout = settings.heartbeat_timeout_s
    if _is_redis(settings.broker_url):
        client, prefix = _redis(settings), _redis_prefix(settings)
        alive = sorted(key.decode()[len(prefix + "alive:"):] for key in client.scan_iter(prefix + "alive:*", count=500))
        last = client.get(prefix + "last_seen")
        return {"alive": alive, "last_seen": float(last) if last else None, "method": "heartbeat"}
    if settings.broker_url.startswith("filesystem://"):
        folder, now = _heartbeat_dir(settings), time.time()
        alive, last_seen = [], None
        if folder.is_dir():
            for file in folder.iterdir():
                try:
                    mtime = file.stat().st_mtime
                except FileNotFoundError:
                    continue
                if file.name == "last_seen":
                    last_seen = mtime
                elif file.name.startswith("alive-") and now - mtime <= timeout:
                    alive.append(file.name[len("alive-"):])
                elif file.name.startswith("alive-") and now - mtime > max(3600.0, 10 * timeout):
                    file.unlink(missing_ok=True)  # a worker long dead (killed: no clean goodbye)
        return {"alive": sorted(alive), "last_seen": last_seen, "method": "heartbeat"}
    # Another broker (AMQP, ...): ask the workers themselves.
    from ..queue import make_celery

    replies = make_celery(settings).control.ping(timeout=1.0) or []
    alive = sorted(name for reply in replies for name in reply)
    return {"alive": alive, "last_seen": time.time() if alive else None, "method": "celery_ping"}


def check_workers(settings: Settings | None = None) -> dict:
    settings = settings or get_settings()
    try:
        status = worker_status(settings)
    except Exception as exc:
        return {"ok": False, "alive": 0, "detail": f"could not read the worker heartbeats ({_first_line(exc)}); "
                                                   "the broker must answer first"}
    if status["alive"]:
        return {"ok": True, "alive": len(status["alive"]), "workers": status["alive"],
                "detail": f"{len(status['alive'])} worker(s) alive on queue {settings.queue!r}"}
    seen = status["last_seen"]
    when = f"the last one was seen {time.time() - seen:.0f} s ago" if seen else "none has been seen"
    return {"ok": False, "alive": 0, "last_seen": seen,
            "detail": f"no worker is alive on queue {settings.queue!r} ({when}); jobs stay queued until one runs: "
                      f"start one with `celery -A worker.celery_app worker -Q {settings.queue}` "
                      "(same DISTILL_* settings as the API)"}


def readiness() -> tuple[bool, dict]:
    settings = get_settings()
    checks = {"database": check_database(), "broker": check_broker(settings)}
    checks["workers"] = check_workers(settings) if checks["broker"]["ok"] else \
        {"ok": False, "alive": 0, "detail": "unknown: the broker does not answer, and workers heartbeat through it"}
    return all(check["ok"] for check in checks.values()), checks


# --------------------------------------------------------------------------- "no worker" events

_looking_since = time.time()  # when this process started looking: "never seen" counts from here


def warn_waiting_jobs(settings: Settings | None = None, now: float | None = None) -> int:
    """One pass: when no worker has been seen for the heartbeat timeout, give every queued job
    that hasn't had it for this outage a ``warning`` event. Returns how many jobs were warned."""
    from ..db import session_scope
    from ..tables import Job, JobEvent

    settings = settings or get_settings()
    status = worker_status(settings)
    if status["alive"]:
        return 0
    now = now or time.time()
    timeout, last_seen = settings.heartbeat_timeout_s, status["last_seen"]
    if now - (last_seen if last_seen is not None else _looking_since) < timeout:
        return 0
    outage = f"{last_seen:.3f}" if last_seen is not None else "never"
    message = f"no worker has been seen for {timeout:g} s; the job waits in the queue"
    with session_scope() as session:
        # Row locks (PostgreSQL) keep two API processes from both warning a job; a job a worker is
        # claiming right now is skipped (it is no longer waiting).
        queued = session.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)
                                 .limit(1000).with_for_update(skip_locked=True)).all()
        if not queued:
            return 0
        warned = {job_id for job_id, data in session.execute(
            select(JobEvent.job_id, JobEvent.data).where(JobEvent.job_id.in_(queued), JobEvent.type == "warning"))
            if (data or {}).get("reason") == NO_WORKER_REASON and (data or {}).get("outage") == outage}
        fresh = [job_id for job_id in queued if job_id not in warned]
        for job_id in fresh:
            session.add(JobEvent(job_id=job_id, type="warning", message=message,
                                 data={"reason": NO_WORKER_REASON, "outage": outage, "queue": settings.queue,
                                       "last_worker_seen_at": int(last_seen) if last_seen else None,
                                       "seconds_without_worker": timeout}))
    if fresh:
        log.warning("no worker seen on queue %r: warned %d waiting job(s)", settings.queue, len(fresh))
    return len(fresh)


_watcher_stop = threading.Event()
_watcher_lock = threading.Lock()
_watcher: threading.Thread | None = None


def _watch() -> None:
    interval = max(0.5, min(5.0, get_settings().heartbeat_timeout_s / 4))
    while not _watcher_stop.wait(interval):
        try:
            warn_waiting_jobs()
        except Exception as exc:  # database/broker away or not migrated: readyz says so; try again
            log.debug("no-worker watcher pass failed: %s", exc)


def start_watcher() -> None:
    global _watcher, _looking_since
    with _watcher_lock:
        if _watcher is None or not _watcher.is_alive():
            _looking_since = time.time()
            _watcher_stop.clear()
            _watcher = threading.Thread(target=_watch, name="no-worker-watcher", daemon=True)
            _watcher.start()


def stop_watcher() -> None:
    _watcher_stop.set()
