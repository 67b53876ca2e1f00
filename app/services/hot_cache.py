"""Short-lived, in-process caches for the request hot path: API key hash -> tenant, and
(tenant, model id) -> what serving needs of the model record.

Without them every /predict pays two database queries and the thread hops around them before
its row reaches the model (issue 9); with them a repeat request reads two dicts.

What they may and may not do:

- Only positive answers are kept (a key that was valid, a model the tenant owns); an unknown or
  revoked key and an unknown model are looked up every time, so a key or model created a moment
  ago is seen at once.
- An entry lives ``ttl_s`` seconds at most (``DISTILL_AUTH_CACHE_S``, ``DISTILL_SERVED_MODEL_CACHE_S``;
  0 turns a cache off), and a cache holds ``max_entries`` at most (the oldest go first).
- Invalidation: the code that revokes a key clears this process's cache at once, and bumps a
  *marker file* (``<artifacts_dir>/.invalidate/<name>``, replaced atomically) after its transaction
  commits. Every lookup ``stat()``s the marker (about a microsecond); a changed marker empties the
  cache. So another process on this machine, or on any machine sharing the artifacts folder (the
  admin CLI, another API worker), sees a revoke at its next request. A process that cannot see the
  marker (another machine with its own artifacts folder) sees it within ``ttl_s``: that is the bound
  to document for multi-machine deployments.
- A lookup that missed, queried the database and found a positive answer stores it only if the
  marker did not change meanwhile (:meth:`TtlCache.generation` / ``put(..., generation=)``): a
  revoke committed while the query ran is never papered over by the stale answer.

When an entry expires, every request in flight misses at once; :func:`single_flight` lets them
share one lookup (one query instead of one per client, and no queue of them in the thread pool
to wait behind, which showed in the tail latency).

Thread-safe: the event loop and threadpool threads both read and write (a dict and a lock; the
critical sections are a few dict operations).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Awaitable, Callable, Hashable

__all__ = ["TtlCache", "bump_marker", "single_flight"]

_Signature = tuple[int, int] | None  # (inode, mtime in ns) of the marker file; None: no marker yet


def _signature(marker: Path | None) -> _Signature:
    if marker is None:
        return None
    try:
        stat = os.stat(marker)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def bump_marker(marker: Path) -> None:
    """Tell every process watching ``marker`` to empty its cache: a new file replaces the old one
    atomically, so its inode (and mtime) change. Best effort: a folder that cannot be written leaves
    the other processes on their TTL."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        scratch = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
        scratch.write_text(f"{time.time_ns()}\n")
        os.replace(scratch, marker)
    except OSError:
        pass


_in_flight: dict[Hashable, asyncio.Future] = {}


async def single_flight(key: Hashable, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``await call(*args)``, shared by every caller that asks for ``key`` while it runs (its result
    or its exception, to each). For lookups whose answer depends on ``key`` only."""
    running = _in_flight.get(key)
    if running is not None and running.get_loop() is asyncio.get_running_loop():
        return await asyncio.shield(running)  # one caller cancelled must not cancel the others
    running = asyncio.ensure_future(call(*args))
    _in_flight[key] = running
    running.add_done_callback(lambda _: _in_flight.pop(key, None) if _in_flight.get(key) is running else None)
    return await asyncio.shield(running)


class TtlCache:
    """key -> value for ``ttl_s`` seconds, at most ``max_entries`` of them, emptied when ``marker``
    changes (see the module docstring)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, marker: Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.marker, self._clock = ttl_s, max(1, max_entries), marker, clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()  # key -> (expires at, value)
        if marker is not None and ttl_s > 0 and _signature(marker) is None:
            bump_marker(marker)  # a stat() that finds the file costs a third of one that raises
        self._seen: _Signature = _signature(marker)
        self._lock = threading.Lock()

    def generation(self) -> _Signature:
        """The marker's state now, emptying the cache if it changed since last seen; pass it to
        :meth:`put` for an answer computed after this call."""
        signature = _signature(self.marker)
        if signature != self._seen:
            with self._lock:
                self._entries.clear()
                self._seen = signature
        return signature

    def get(self, key: Hashable) -> Any | None:
        if self.ttl_s <= 0:
            return None
        self.generation()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            with self._lock:
                self._entries.pop(key, None)
            return None
        return entry[1]

    def get_many(self, keys: list[Hashable]) -> dict[Hashable, Any]:
        """{key: value} for those of ``keys`` held (one look at the marker for them all)."""
        if self.ttl_s <= 0:
            return {}
        self.generation()
        now, found = self._clock(), {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                found[key] = entry[1]
        return found

    def put(self, key: Hashable, value: Any, generation: _Signature | Any = ...) -> None:
        """Keep ``value``; with ``generation`` (from :meth:`generation` before the lookup that
        produced it), only if the marker has not changed since."""
        if self.ttl_s <= 0:
            return
        if generation is not ... and self.generation() != generation:
            return
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, match: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key ``match``es (e.g. a deleted model's, under every tenant)."""
        with self._lock:
            for key in [k for k in self._entries if match(k)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
