"""The connection pool on the real PostgreSQL (in-process: these test app/db.py's functions; the API's
use of them is tested end to end in test_api_create_path.py):

- a pooled connection that sat idle past ``ping_after_idle_s`` is pinged when checked out, and one the
  server closed meanwhile is replaced before the caller sees it; one handed back a moment ago is not
  pinged (the round trip ``pool_pre_ping`` paid on every request);
- ``read_row`` (one statement in autocommit) answers like a session, leaves no transaction open, and
  after the server dropped its connection raises SQLAlchemy's DBAPIError (the API's 503), then works
  again on a fresh connection.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import DBAPIError

from app import db
from app.tables import ApiKey

from ..conftest import _admin, app_in_process


def _backend(engine) -> int:
    with engine.connect() as connection:
        return connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _counting_pings(engine, monkeypatch) -> list[int]:
    pings = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda dbapi_connection: pings.append(1) or ping(dbapi_connection))
    return pings


def test_an_idle_connection_the_server_closed_is_replaced_on_checkout(service_env, monkeypatch):
    engine = db.make_engine(service_env["DISTILL_DATABASE_URL"], pool_size=1, max_overflow=0, ping_after_idle_s=0.2)
    pings = _counting_pings(engine, monkeypatch)
    try:
        first = _backend(engine)
        assert _backend(engine) == first and pings == []  # back in the pool a moment ago: no ping
        _admin(f"SELECT pg_terminate_backend({first})")
        time.sleep(0.4)
        second = _backend(engine)  # pinged, found dead, replaced: no error reaches the caller
        assert second != first and len(pings) == 1
    finally:
        engine.dispose()


@pytest.fixture
def in_process(service_env, monkeypatch):
    with app_in_process(service_env, monkeypatch):
        yield db.get_engine()


KEY = select(ApiKey.__table__).where(ApiKey.__table__.c.tenant_id == bindparam("tenant"),
                                     ApiKey.__table__.c.revoked_at.is_(None)).order_by(ApiKey.__table__.c.id)


def test_read_row_reads_in_autocommit_and_survives_a_dropped_connection(in_process, service_env):
    engine = in_process
    with db.session_scope() as session:
        expected = session.execute(KEY, {"tenant": "test"}).mappings().first()
    row = db.read_row(KEY, {"tenant": "test"})
    assert row == dict(expected) and row["tenant_id"] == "test"
    assert db.read_row(KEY, {"tenant": "no-such-tenant"}) is None
    with engine.connect() as connection:  # the pooled connection came back idle, not inside a transaction
        assert connection.connection.dbapi_connection.get_transaction_status() == 0  # TRANSACTION_STATUS_IDLE
        backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        connection.rollback()
    _admin(f"SELECT pg_terminate_backend({backend})")  # dropped while in the pool (checked out a moment later)
    with pytest.raises(DBAPIError) as raised:
        db.read_row(KEY, {"tenant": "test"})
    assert raised.value.connection_invalidated
    assert db.read_row(KEY, {"tenant": "test"}) == dict(expected)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
