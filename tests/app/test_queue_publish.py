"""enqueue_jobs on the real Redis broker: a batch of submits goes out as one pipelined publish, in
order; if the batch fails it is published again one by one (Celery's retries), and a broker that
is down fails every job with its reason. (In-process: this tests one function; the API's create
path is tested end to end in test_api_create_path.py.)"""

import json
import uuid

import pytest
import redis
from kombu.messaging import Producer

from app import queue
from app.config import get_settings

from ..conftest import REDIS_URL


@pytest.fixture
def broker(monkeypatch):
    name = f"distill-test-publish-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DISTILL_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("DISTILL_QUEUE", name)
    get_settings.cache_clear()
    queue._publisher.cache_clear()
    client = redis.Redis.from_url(REDIS_URL)
    yield client, name
    client.delete(name)
    get_settings.cache_clear()
    queue._publisher.cache_clear()


def _waiting(client, name) -> list[str]:
    """Job ids of the messages in the queue, oldest first (LPUSH puts the newest at the head)."""
    return [json.loads(json.loads(raw)["headers"]["argsrepr"].replace("'", '"'))[0]
            for raw in reversed(client.lrange(name, 0, -1))]


def test_a_batch_is_published_in_order(broker):
    client, name = broker
    ids = [f"job_{i:02d}" for i in range(20)]
    assert queue.enqueue_jobs(ids) == {}
    assert queue.enqueue_jobs(["job_single"]) == {}
    assert _waiting(client, name) == ids + ["job_single"]


def test_a_failed_batch_is_published_one_by_one(broker, monkeypatch):
    client, name = broker
    calls = []

    def broken_batch(self, max_size=1000):
        calls.append(max_size)
        raise ConnectionError("pipeline refused")

    monkeypatch.setattr(Producer, "batch", broken_batch)
    ids = ["job_a", "job_b", "job_c"]
    assert queue.enqueue_jobs(ids) == {}
    assert calls and _waiting(client, name) == ids  # each once, in order


def test_a_broker_that_is_down_fails_every_job(monkeypatch):
    monkeypatch.setenv("DISTILL_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv("DISTILL_QUEUE", f"distill-test-publish-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    queue._publisher.cache_clear()
    try:
        failed = queue.enqueue_jobs(["job_x", "job_y"])
    finally:
        get_settings.cache_clear()
        queue._publisher.cache_clear()
    assert set(failed) == {"job_x", "job_y"}
    assert all("127.0.0.1:1" in str(exc) or "refused" in str(exc).lower() for exc in failed.values())
