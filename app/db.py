"""Engine and sessions. Created on first use, never at import; the schema is made by
``alembic upgrade head`` as its own step.

The pool keeps as many connections open as the API's thread pool can use at once (each request
holds at most one): under load, opening and closing a connection per request (PostgreSQL forks a
backend for each) costs more than the request itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.sql import Executable
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from .config import get_settings

__all__ = ["get_engine", "new_session", "session_scope", "get_session", "read_row"]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits on the writer's lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, idle_transaction_timeout_s: float | None = None, pool_size: int = 40,
                max_overflow: int = 10, ping_after_idle_s: float | None = None) -> Engine:
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
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow, connect_args=connect_args)
    _ping_after_idle(engine, PING_AFTER_IDLE_S if ping_after_idle_s is None else ping_after_idle_s)
    return engine


PING_AFTER_IDLE_S = 1.0


def _ping_after_idle(engine: Engine, idle_s: float) -> None:
    """Pessimistic disconnect handling, paid only where it can matter: a connection that sat in the pool
    for more than ``idle_s`` is pinged (``SELECT 1``) when it is checked out, and a dead one is replaced
    before the request sees it (after a database restart, a failover, a firewall's idle timeout).

    ``pool_pre_ping`` pings on every checkout: one extra round trip per request, which on a busy API
    was ~14% of its time (issue 9: the create + get benchmark), while a connection handed back
    milliseconds ago is as alive as it was then. If the database goes away while connections are busy,
    the statement that finds out fails (503, see ``readiness.database_error_response``) and SQLAlchemy
    invalidates the whole pool, so the next checkouts connect afresh."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:
        since = record.info.get("checked_in_at")
        if since is None or time.monotonic() - since <= idle_s:
            return  # new, or back in the pool a moment ago
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            alive = False
        if not alive:
            raise DisconnectionError("the pooled connection was closed by the database; reconnecting")


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.database_idle_transaction_timeout_s,
                       settings.database_pool_size, settings.database_max_overflow)


def read_row(statement: Executable, params: dict) -> dict | None:
    """The first row of a read-only ``statement`` (by column name), or None. Blocking: call it from a
    worker thread.

    On PostgreSQL (psycopg2) one round trip: the statement runs in autocommit on a pooled connection,
    where a session would send BEGIN, the statement and ROLLBACK (three round trips, ~0.1 ms each
    on a loopback; issue 9's GET of a job is one statement, and a single statement sees one snapshot
    either way). Errors are SQLAlchemy's, as from a session: a lost connection is invalidated and
    raised as a DBAPIError (503). Other databases take the plain Core path."""
    engine = get_engine()
    if engine.dialect.driver != "psycopg2":
        with engine.connect() as connection:
            row = connection.execute(statement, params).mappings().first()
            return dict(row) if row is not None else None
    sql, constants = _compiled_sql(statement)
    params = {**constants, **params}
    pooled = engine.raw_connection()
    dbapi_connection = pooled.driver_connection
    try:
        dbapi_connection.autocommit = True  # a client-side flag in psycopg2: no round trip
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(sql, params)
                row = cursor.fetchone()
                return None if row is None else dict(zip((c.name for c in cursor.description), row))
        finally:
            if not dbapi_connection.closed:
                dbapi_connection.autocommit = False
    except engine.dialect.loaded_dbapi.Error as exc:
        disconnected = engine.dialect.is_disconnect(exc, dbapi_connection, None)
        if disconnected:
            pooled.invalidate(exc)
        raise DBAPIError.instance(sql, params, exc, engine.dialect.loaded_dbapi.Error,
                                  connection_invalidated=disconnected, dialect=engine.dialect) from exc
    finally:
        pooled.close()


@lru_cache(maxsize=32)
def _compiled_sql(statement: Executable) -> tuple[str, dict]:
    """``statement`` as the SQL text psycopg2 takes (``%(name)s`` parameters) and the values of the
    parameters it binds itself (its literals); statements are built once."""
    compiled = statement.compile(dialect=get_engine().dialect)
    return str(compiled), {name: value for name, value in compiled.params.items() if value is not None}


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def new_session() -> Session:
    """A session of the service's engine (the caller closes it)."""
    return _session_factory()()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = new_session()
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
    session = new_session()
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
