"""``Idempotency-Key`` on the create routes (``POST /v1/files``, ``POST /v1/distillation/jobs``),
with Stripe's semantics. A key belongs to a tenant and is bound to the first request it came
with (sha256 of method, path and body; an upload hashes its file's bytes and form fields).

- First use: a row "in flight" (``status_code`` null) is inserted and committed at once, in a
  transaction of its own. The unique (tenant, key) makes a concurrent duplicate lose that
  insert: it answers 409 (``Retry-After: 1``) and creates nothing.
- The request runs. Its 2xx response is written into the row in the request's own
  transaction, so the created object and the recorded response commit together.
- It fails (any error): the row is deleted, so the key may be retried; nothing was created.
- Again within 24 h with the same request: the recorded response is replayed (same status,
  same body, same id) with ``Idempotent-Replayed: true``; with another request: 422 naming
  ``Idempotency-Key``. After 24 h the key is forgotten.

A first request whose process died mid-way leaves its key in flight (409) until it expires:
answering 409 is safe, guessing that it died could create a second object.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import BinaryIO, Callable

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import session_scope
from ..errors import Unprocessable
from ..errors import InFlight
from ..tables import IdempotencyKey, utcnow

__all__ = ["HEADER", "TTL", "request_sha256", "upload_sha256", "run"]

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


def _claim(tenant: str, key: str, fingerprint: str) -> IdempotencyKey | None:
    """None when the key is now ours (an in-flight row is committed); else the key's earlier row."""
    for _ in range(3):  # the earlier row may be deleted (its request failed) between our insert and our read
        try:
            with session_scope() as session:
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant,
                                                             IdempotencyKey.created_at < utcnow() - TTL))
                session.add(IdempotencyKey(tenant_id=tenant, key=key, request_sha256=fingerprint, created_at=utcnow()))
            return None
        except IntegrityError:
            pass
        with session_scope() as session:
            row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant,
                                                              IdempotencyKey.key == key))
        if row is not None:
            return row
    return IdempotencyKey(tenant_id=tenant, key=key, request_sha256=fingerprint, status_code=None)


def _answer_earlier(row: IdempotencyKey, key: str, fingerprint: str) -> JSONResponse:
    if row.request_sha256 != fingerprint:
        raise Unprocessable(f"{HEADER} {key!r} was already used with a different request in the last 24 hours; "
                            "send a new key for a new request", param=HEADER, code="idempotency_key_reused")
    if row.status_code is None:
        raise InFlight(f"a request with {HEADER} {key!r} is still in progress; retry to get its response",
                       param=HEADER, headers={"Retry-After": "1"})
    return JSONResponse(row.response_body, status_code=row.status_code, headers={"Idempotent-Replayed": "true"})


def _forget(tenant: str, key: str) -> None:
    with session_scope() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant, IdempotencyKey.key == key,
                                                     IdempotencyKey.status_code.is_(None)))


def run(session: Session, tenant: str, key: str | None, fingerprint: str, status_code: int,
        create: Callable[[], BaseModel]) -> BaseModel | JSONResponse:
    """``create()`` once per (tenant, key): the first time it runs and its response is recorded in
    ``session``; later the recorded response is replayed. Without a key it just runs."""
    if key is None:
        return create()
    earlier = _claim(tenant, key, fingerprint)
    if earlier is not None:
        return _answer_earlier(earlier, key, fingerprint)
    try:
        result = create()
        session.execute(update(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant, IdempotencyKey.key == key)
                        .values(status_code=status_code, response_body=result.model_dump(mode="json")))
    except BaseException:
        session.rollback()  # whatever the request wrote goes, then the key is free again
        _forget(tenant, key)
        raise
    return result
