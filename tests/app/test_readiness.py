"""Readiness against the live stack: /readyz names what is missing (a stopped or killed worker,
a database without the schema or behind it), a request against an unmigrated database is a 503
that says to run ``alembic upgrade head``, queued jobs say their place in the queue, and waiting
jobs are told once when no worker has been seen for the heartbeat timeout.

The tests that stop workers or change the schema run on a stack of their own (tests/app/stack.py)
with a fresh database of their own, so no other test's jobs or workers are counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.conftest import PG_HOST, PG_USER, ROOT, _admin, _stop, create_api_key

from .helpers import events, job_body, submit, upload, wait_for
from .stack import Stack


def _poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture
def fresh_database(service_env):
    """A new, empty PostgreSQL database: (env pointing at it, alembic runner)."""
    name = f"distill_ready_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    env = {**service_env, "DISTILL_DATABASE_URL": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{name}"}

    def alembic(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    yield env, alembic
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def migrated_stack(fresh_database, tmp_path):
    env, alembic = fresh_database
    alembic("upgrade", "head")
    env["_API_KEY"] = create_api_key(env, "ready")["key"]
    with Stack(env, tmp_path) as own:
        yield own


def _readyz(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=30)


def test_readyz_is_ready_with_the_test_stack(api_url, workers):
    response = _poll(lambda: (r := _readyz(api_url)).status_code == 200 and r, 30, "readiness")
    body = response.json()
    assert body["status"] == "ready"
    assert {name for name, check in body["checks"].items() if check["ok"]} == {"database", "broker", "workers"}
    assert body["checks"]["workers"]["alive"] == len(workers)
    assert body["checks"]["database"]["revision"] == body["checks"]["database"]["head"]
    assert "Authorization" not in response.request.headers  # no API key needed, like /healthz


def test_readyz_names_a_stopped_and_a_killed_worker(migrated_stack):
    stack = migrated_stack
    not_ready = _readyz(stack.url)
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "not_ready"
    checks = not_ready.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"] and not checks["workers"]["ok"]
    assert "no worker" in checks["workers"]["detail"] and stack.env["DISTILL_QUEUE"] in checks["workers"]["detail"]

    stopped, killed = stack.start_worker(), stack.start_worker()
    ready = _poll(lambda: (r := _readyz(stack.url)).status_code == 200 and r.json()["checks"]["workers"]["alive"] == 2
                  and r, 30, "two live workers")
    assert ready.json()["status"] == "ready"

    _stop(stopped)  # SIGTERM: a clean shutdown drops its heartbeat at once
    one_left = _readyz(stack.url)
    assert one_left.status_code == 200 and one_left.json()["checks"]["workers"]["alive"] == 1

    os.kill(killed.pid, signal.SIGKILL)  # no goodbye: missing once its heartbeat is older than the timeout (3 s)
    killed.wait(timeout=10)
    response = _poll(lambda: (r := _readyz(stack.url)).status_code == 503 and r, 30, "the killed worker to be missed")
    workers_check = response.json()["checks"]["workers"]
    assert workers_check == {**workers_check, "ok": False, "alive": 0}
    assert "last one was seen" in workers_check["detail"]
    assert "celery -A worker.celery_app worker" in workers_check["detail"]


def test_unmigrated_database_is_a_503_naming_alembic(fresh_database, tmp_path):
    env, alembic = fresh_database  # no `alembic upgrade head`: not a single table
    for sub in ("empty", "behind"):
        (tmp_path / sub).mkdir()
    with Stack(env, tmp_path / "empty") as stack:
        readyz = _readyz(stack.url)
        assert readyz.status_code == 503
        database = readyz.json()["checks"]["database"]
        assert database["ok"] is False and "alembic upgrade head" in database["detail"]
        assert readyz.json()["checks"]["broker"]["ok"] is True  # only what is missing is named

        response = stack.client.get("/distillation/jobs")  # the API key lookup meets no tables
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["code"] == "database_not_ready" and "alembic upgrade head" in problem["detail"]
        assert "this is a bug" not in response.text

    alembic("upgrade", "0003")  # a database one migration behind (API keys come in 0004)
    with Stack(env, tmp_path / "behind") as stack:
        database = _readyz(stack.url).json()["checks"]["database"]
        assert database["ok"] is False and database["revision"] == "0003"
        assert "0003" in database["detail"] and database["head"] in database["detail"]
        assert "alembic upgrade head" in database["detail"]
        response = stack.client.get("/files")
        assert response.status_code == 503 and "alembic upgrade head" in response.json()["detail"]


def test_queue_position_and_the_no_worker_warning(migrated_stack, problem):
    stack = migrated_stack
    client = stack.client
    teacher, train = upload(client, problem.teacher, "model")["id"], upload(client, problem.train_csv, "dataset")["id"]
    jobs = [submit(client, job_body(teacher, train, epochs=2)) for _ in range(3)]  # no worker runs
    assert [j["queue_position"] for j in jobs] == [1, 2, 3]
    assert [client.get(f"/distillation/jobs/{j['id']}").json()["queue_position"] for j in jobs] == [1, 2, 3]
    listed = {j["id"]: j["queue_position"] for j in client.get("/distillation/jobs").json()["data"]}
    assert listed == {jobs[0]["id"]: 1, jobs[1]["id"]: 2, jobs[2]["id"]: 3}

    def warnings(job_id: str) -> list[dict]:
        return [e for e in events(client, job_id) if e["type"] == "warning"]

    for job in jobs:  # no worker has ever been seen; the heartbeat timeout is 3 s in this stack
        warned = _poll(lambda: warnings(job["id"]), 30, "the no-worker warning")
        assert warned[0]["message"] == "no worker has been seen for 3 s; the job waits in the queue"
        assert warned[0]["data"]["reason"] == "no_worker"
    time.sleep(3)  # several more passes of the watcher (every 0.75 s here): still one warning per outage
    assert [len(warnings(j["id"])) for j in jobs] == [1, 1, 1]

    cancelled = client.post(f"/distillation/jobs/{jobs[0]['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert [client.get(f"/distillation/jobs/{j['id']}").json()["queue_position"] for j in jobs[1:]] == [1, 2]

    stack.start_worker()
    started = wait_for(client, jobs[1]["id"], statuses={"running", "succeeded"}, timeout=120)
    assert started["queue_position"] is None
    for job in jobs[1:]:
        finished = wait_for(client, job["id"], timeout=180)
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["queue_position"] is None
    assert [len(warnings(j["id"])) for j in jobs] == [1, 1, 1]  # a live worker adds no more
