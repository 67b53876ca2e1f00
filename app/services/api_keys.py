"""API keys: each belongs to a tenant, and only its sha256 is stored.

A key is ``dsk_`` + 43 url-safe characters (256 random bits). It is shown once, when it
is created; afterwards only its id (``key-…``) is ever listed. The request path looks a
key up by its hash, so a lookup never compares secrets character by character.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..tables import ApiKey, new_id, utcnow

__all__ = ["KEY_PREFIX", "TENANT_PATTERN", "create_key", "list_keys", "revoke_key", "tenant_for_key", "key_sha256"]

KEY_PREFIX = "dsk_"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_PATTERN = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str) -> tuple[ApiKey, str]:
    """A new key for ``tenant`` (created by its first key); returns the row and the plain key."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant names are 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                         f"or digit); got {tenant!r}")
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant, key_sha256=key_sha256(plain), created_at=utcnow())
    session.add(row)
    session.flush()
    return row, plain


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == tenant)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> tuple[ApiKey | None, bool]:
    """Revoke at once (the next request with it is a 401): (the key or None, whether this call revoked
    it). Revoking twice keeps the first time."""
    result = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow()))
    return session.get(ApiKey, key_id, populate_existing=True), result.rowcount == 1


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant a presented key belongs to; None if it is malformed, unknown or revoked."""
    if not _KEY_PATTERN.fullmatch(key):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == key_sha256(key)))
    return row.tenant_id if row is not None and row.revoked_at is None else None
