"""API keys: each belongs to a tenant, and only its sha256 is stored.

A key is ``dsk_`` + 43 url-safe characters (256 random bits). It is shown once, when it
is created; afterwards only its id (``key-…``) is ever listed. The request path looks a
key up by its hash, so a lookup never compares secrets character by character.

Each API process keeps a valid key's hash -> tenant for ``DISTILL_AUTH_CACHE_S`` seconds
(:func:`tenant_of`; see ``hot_cache`` for the rules): a request with a
known key costs a sha256 and a dict read, not a query. Unknown and revoked keys are never kept.
:func:`revoke_key` empties this process's cache at once and, once its transaction commits, bumps
the marker file every other process on the machine (or sharing the artifacts folder) checks on
each lookup, so the next request with the key is a 401 there too.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from ..config import Settings, get_settings
from ..db import session_scope
from ..tables import ApiKey, new_id, utcnow
from .hot_cache import TtlCache, bump_marker, single_flight

__all__ = ["KEY_PREFIX", "TENANT_PATTERN", "create_key", "list_keys", "revoke_key", "tenant_for_key", "key_sha256",
           "cached_tenant", "lookup_tenant", "tenant_of"]

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
    _key_cache().clear()
    # The other processes re-read once the revoke is visible to them: after the commit, not before
    # (a process that re-read in between would cache the key as still valid).
    event.listen(session, "after_commit", lambda _session: _forget_all_keys(), once=True)
    return session.get(ApiKey, key_id, populate_existing=True), result.rowcount == 1


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant a presented key belongs to; None if it is malformed, unknown or revoked."""
    if not _KEY_PATTERN.fullmatch(key):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == key_sha256(key)))
    return row.tenant_id if row is not None and row.revoked_at is None else None


# ---- the per-process cache of valid keys ----------------------------------------------------------------------

_cache: tuple[Settings, TtlCache] | None = None


def _marker(settings: Settings) -> Path:
    return Path(settings.artifacts_dir).resolve() / ".invalidate" / "api_keys"


def _key_cache() -> TtlCache:
    """This process's cache, made anew when the settings are (tests reload them)."""
    global _cache
    settings = get_settings()
    if _cache is None or _cache[0] is not settings:
        _cache = (settings, TtlCache(settings.auth_cache_s, marker=_marker(settings)))
    return _cache[1]


def _forget_all_keys() -> None:
    _key_cache().clear()
    bump_marker(_key_cache().marker)


def cached_tenant(key: str) -> str | None:
    """The tenant of a key this process found valid within the cache's TTL (and not revoked since, as
    far as the marker tells); None means "look it up", not "invalid"."""
    return _key_cache().get(key_sha256(key)) if _KEY_PATTERN.fullmatch(key) else None


async def tenant_of(key: str) -> str | None:
    """The tenant of a presented key (None: malformed, unknown or revoked), from the cache when this
    process saw the key lately, else from the database in a worker thread. Concurrent requests with
    one key share one lookup, unless a revoke was signalled since it began."""
    tenant = cached_tenant(key)
    if tenant is not None or not _KEY_PATTERN.fullmatch(key):
        return tenant
    generation = _key_cache().generation()
    return await single_flight(("api_key", generation, key_sha256(key)), run_in_threadpool, lookup_tenant, key)


def lookup_tenant(key: str) -> str | None:
    """:func:`tenant_for_key` in a session of its own (blocking: call it from a worker thread), keeping
    a valid key's tenant in the cache."""
    if not _KEY_PATTERN.fullmatch(key):
        return None
    cache = _key_cache()
    generation = cache.generation()
    with session_scope() as session:
        tenant = tenant_for_key(session, key)
    if tenant is not None:
        cache.put(key_sha256(key), tenant, generation=generation)
    return tenant
