"""Micro-batching for /predict: concurrent requests for one model become one forward.

Requests are queued per key (a model id + its weights' sha256: different models never share a
batch). A key's drain task takes the queued requests, waits for more while fewer than ``max_batch`` rows
are waiting until the oldest has waited ``max_wait_s``, and hands whole requests (never split; a request larger
than ``max_batch`` runs alone) to ``run`` in a worker thread. ``run`` gets a list of row lists and
returns one result per request: a list of per-row results, or an exception that is raised in that
request only. While a batch runs, new requests queue up and form the next one, so under load
batches fill without waiting; with one client the wait adds at most ``max_wait_s``.

The batcher is per process and bounded: past ``max_pending`` queued requests, ``submit`` refuses
with 503 and ``Retry-After`` (the service is overloaded, not the client over a quota: not 429).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Unavailable

__all__ = ["MicroBatcher", "Runner"]

Runner = Callable[[list[list]], list[Any]]
"""One batch: each request's rows in; per request, its row results or an exception."""


@dataclass
class _Pending:
    rows: list
    future: asyncio.Future
    arrived: float


@dataclass
class _Queue:
    run: Runner
    items: deque = field(default_factory=deque)
    rows: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_s: float, max_pending: int, threads: int = 2,
                 initializer: Callable[[], None] | None = None):
        self.max_batch, self.max_wait_s, self.max_pending = max(1, max_batch), max(0.0, max_wait_s), max_pending
        self._queues: dict[str, _Queue] = {}
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="predict",
                                            initializer=initializer)

    @property
    def pending(self) -> int:
        return self._pending

    async def submit(self, key: str, rows: list, run: Runner) -> list:
        """This request's row results once its batch ran (``run`` is the key's runner: the first
        request's is used for a queue's life, so it must depend on the key only)."""
        if self._pending >= self.max_pending:
            raise Unavailable(f"the prediction queue is full ({self.max_pending} requests waiting); retry shortly",
                              headers={"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(run)
            asyncio.get_running_loop().create_task(self._drain(key, queue))
        queue.items.append(_Pending(rows, future, asyncio.get_running_loop().time()))
        queue.rows += len(rows)
        self._pending += 1
        queue.arrived.set()
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _drain(self, key: str, queue: _Queue) -> None:
        loop = asyncio.get_running_loop()
        try:
            while queue.items:
                if queue.rows < self.max_batch and self.max_wait_s > 0:
                    # The oldest request waits at most max_wait_s in all (one queued during the
                    # previous forward has already waited: it goes at once).
                    deadline = queue.items[0].arrived + self.max_wait_s
                    while queue.rows < self.max_batch and (left := deadline - loop.time()) > 0:
                        queue.arrived.clear()
                        try:
                            await asyncio.wait_for(queue.arrived.wait(), left)
                        except asyncio.TimeoutError:
                            break
                batch = [queue.items.popleft()]
                rows = len(batch[0].rows)
                while queue.items and rows + len(queue.items[0].rows) <= self.max_batch:
                    rows += len(queue.items[0].rows)
                    batch.append(queue.items.popleft())
                queue.rows -= rows
                self._pending -= len(batch)
                try:
                    results = await loop.run_in_executor(self._executor, queue.run, [p.rows for p in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"batch runner returned {len(results)} results for {len(batch)} requests")
                except BaseException as exc:  # noqa: BLE001 - every waiting request must hear of it
                    results = [exc] * len(batch)
                for pending, result in zip(batch, results):
                    if not pending.future.done():  # the client may have gone (cancelled)
                        pending.future.set_result(result)
        finally:
            # No await between the last emptiness check and this: a request arriving now finds no
            # queue and starts a fresh drain task.
            if self._queues.get(key) is queue:
                del self._queues[key]
            for pending in queue.items:  # only on an unexpected error above
                self._pending -= 1
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the prediction batcher stopped"))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
