"""Engine and sessions. Created on first use, never at import; the schema is made by
``alembic upgrade head`` as its own step.

The pool keeps as many connections open as the API's thread pool can use at once (each request
holds at most one): under load, opening and closing a connection per request (PostgreSQL forks a
backend for each) costs more than the request itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from .config import get_settings

__all__ = ["get_engine", "session_scope", "get_session"]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits on the writer's lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, idle_transaction_timeout_s: float | None = None, pool_size: int = 40,
                max_overflow: int = 10) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if idle_transaction_timeout_s and url.startswith("postgresql"):
        # A process frozen inside a transaction (paused, swapped out) holds its row locks; the
        # server ends such a session after this, so the reconciler can hand the job on.
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_transaction_timeout_s * 1000)}"
    # One request holds one connection (idempotency claims run on the request's session), so a pool as
    # large as the API's thread pool never makes a request wait for a connection its peers hold.
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
                         connect_args=connect_args)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.database_idle_transaction_timeout_s,
                       settings.database_pool_size, settings.database_max_overflow)


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def get_session() -> AsyncIterator[Session]:
    """FastAPI dependency: one session per request, committed when the route returns (rolled back if
    it raises). Async, so that opening it costs no trip through the thread pool (a session opens no
    connection until it is first used); the commit, which talks to the database, runs in a worker
    thread, and only if the route left a transaction open: a route that ended its own (a read that
    closed its session, a submit that committed in its batch) costs no thread hop at the end either."""
    session = _session_factory()()
    try:
        yield session
    except Exception:
        if session.in_transaction():
            await run_in_threadpool(_end, session, False)
        raise
    except BaseException:  # cancelled: don't wait here; the thread pool rolls back and closes
        asyncio.get_running_loop().run_in_executor(None, _end, session, False)
        raise
    if session.in_transaction() or session.new or session.dirty or session.deleted:
        await run_in_threadpool(_end, session, True)
    else:
        session.close()  # holds no connection: no I/O


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
