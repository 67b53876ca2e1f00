"""``Idempotency-Key`` on the create routes (``POST /v1/files``, ``POST /v1/distillation/jobs``),
with Stripe's semantics. A key belongs to a tenant and is bound to the first request it came
with (sha256 of method, path and body; an upload hashes its file's bytes and form fields).

- First use: a row "in flight" (``status_code`` null) is inserted and committed at once, in a
  transaction of its own (on the request's session: one pooled connection per request). The unique (tenant, key) makes a concurrent duplicate lose that
  insert: it answers 409 (``Retry-After: 1``) and creates nothing.
- The request runs. Its 2xx response is written into the row in the request's own
  transaction, so the created object and the recorded response commit together (a job's
  submit: :func:`claim`, then the jobs' batch writes the job and :func:`record` records its response).
- It fails (any error): the row is deleted, so the key may be retried; nothing was created
  (or, when the job's publish failed after the commit, the job was marked failed: a retry with
  the same key submits it anew).
- Again within 24 h with the same request: the recorded response is replayed (same status,
  same body, same id) with ``Idempotent-Replayed: true``; with another request: 422 naming
  ``Idempotency-Key``. After 24 h the key is forgotten.

A first request whose process died mid-way leaves its key in flight (409) until it expires:
answering 409 is safe, guessing that it died could create a second object.
"""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta
from typing import BinaryIO, Callable

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import Unprocessable
from ..errors import InFlight
from ..tables import IdempotencyKey, utcnow

__all__ = ["HEADER", "TTL", "request_sha256", "upload_sha256", "run", "claim", "record", "forget"]

HEADER = "Idempotency-Key"
TTL = timedelta(hours=24)
CHUNK = 1 << 20


def request_sha256(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no two splits hash alike
    return digest.hexdigest()


def upload_sha256(path: str, source: BinaryIO, **fields: str) -> str:
    """A multipart upload's fingerprint: its form fields and the file's bytes (read, then rewound)."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        digest.update(f"{name}={fields[name]!r}\n".encode())
    source.seek(0)
    while chunk := source.read(CHUNK):
        digest.update(chunk)
    source.seek(0)
    return request_sha256("POST", path, digest.digest())


def _claim_row(session: Session, tenant: str, key: str, fingerprint: str) -> IdempotencyKey | None:
    """None when the key is now ours (an in-flight row is committed); else the key's earlier row.

    On the request's own session (one pooled connection per request: a second session here, while
    the request's holds a connection, could wait forever on a pool its peers have emptied). An
    expired row of the same key is deleted when the insert meets it; other expired rows are swept
    at most once a minute per process (:func:`_sweep_expired`), not on every create."""
    _sweep_expired(session, tenant)
    for _ in range(3):  # the earlier row may be deleted (its request failed) between our insert and our read
        try:
            session.add(IdempotencyKey(tenant_id=tenant, key=key, request_sha256=fingerprint, created_at=utcnow()))
            session.commit()
            return None
        except IntegrityError:
            session.rollback()
        expired = session.execute(delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant, IdempotencyKey.key == key, IdempotencyKey.created_at < utcnow() - TTL))
        session.commit()
        if expired.rowcount:
            continue
        row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant,
                                                          IdempotencyKey.key == key))
        session.rollback()  # end the read's transaction: the request goes on in a fresh one
        if row is not None:
            return row
    return IdempotencyKey(tenant_id=tenant, key=key, request_sha256=fingerprint, status_code=None)


_SWEEP_EVERY_S = 60.0
_last_sweep: dict[str, float] = {}


def _sweep_expired(session: Session, tenant: str) -> None:
    """Delete the tenant's keys older than :data:`TTL`, at most once a minute per process (an index range
    on ``created_at``); a commit of its own, before the claim."""
    now = time.monotonic()
    if now - _last_sweep.get(tenant, -_SWEEP_EVERY_S) < _SWEEP_EVERY_S:
        return
    _last_sweep[tenant] = now
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant,
                                                 IdempotencyKey.created_at < utcnow() - TTL))
    session.commit()


def _answer_earlier(row: IdempotencyKey, key: str, fingerprint: str) -> JSONResponse:
    if row.request_sha256 != fingerprint:
        raise Unprocessable(f"{HEADER} {key!r} was already used with a different request in the last 24 hours; "
                            "send a new key for a new request", param=HEADER, code="idempotency_key_reused")
    if row.status_code is None:
        raise InFlight(f"a request with {HEADER} {key!r} is still in progress; retry to get its response",
                       param=HEADER, headers={"Retry-After": "1"})
    return JSONResponse(row.response_body, status_code=row.status_code, headers={"Idempotent-Replayed": "true"})


def claim(session: Session, tenant: str, key: str, fingerprint: str) -> JSONResponse | None:
    """None when the key is now this request's (its in-flight row committed); else the earlier
    request's recorded response to replay (409 while it is in flight, 422 for another request)."""
    earlier = _claim_row(session, tenant, key, fingerprint)
    return None if earlier is None else _answer_earlier(earlier, key, fingerprint)


def record(session: Session, tenant: str, responses: list[tuple[str, int, dict]]) -> None:
    """Write (key, status code, body) responses into their in-flight rows, in ``session``'s transaction
    (with the objects they created); one statement for them all."""
    if not responses:
        return
    table = IdempotencyKey.__table__
    session.connection().execute(
        update(table).where(table.c.tenant_id == bindparam("b_tenant"), table.c.key == bindparam("b_key"))
        .values(status_code=bindparam("b_status"), response_body=bindparam("b_body")),
        [{"b_tenant": tenant, "b_key": key, "b_status": status, "b_body": body} for key, status, body in responses])


def forget(session: Session, tenant: str, key: str) -> None:
    """Free the key after the request failed: its row goes, recorded or not (a response recorded and
    committed before a later step failed, e.g. the job's publish, is not what the client was told)."""
    session.rollback()  # whatever the request wrote and did not commit goes first
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant, IdempotencyKey.key == key))
    session.commit()


def run(session: Session, tenant: str, key: str | None, fingerprint: str, status_code: int,
        create: Callable[[], BaseModel]) -> BaseModel | JSONResponse:
    """``create()`` once per (tenant, key): the first time it runs and its response is recorded in
    ``session``; later the recorded response is replayed. Without a key it just runs."""
    if key is None:
        return create()
    earlier = claim(session, tenant, key, fingerprint)
    if earlier is not None:
        return earlier
    try:
        result = create()
        record(session, tenant, [(key, status_code, result.model_dump(mode="json"))])
    except BaseException:
        forget(session, tenant, key)
        raise
    return result
