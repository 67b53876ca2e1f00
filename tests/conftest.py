"""The real stack for the service tests: a fresh PostgreSQL database, a Redis broker
(on a queue of this run's own), migrations by ``alembic upgrade head``, the API under
uvicorn and two Celery worker processes. Nothing here is mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import json

import httpx
import psycopg2
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("DISTILL_TEST_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("DISTILL_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UPLOAD_LIMIT = 2 * 1024 * 1024  # small, so the 413 path is cheap to test


def _admin(statement: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    connection = psycopg2.connect(host=PG_HOST, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@contextmanager
def app_in_process(env: dict, monkeypatch, **overrides: str):
    """The app's settings, engine, sessions and storage, in this test process, pointed at ``env``'s
    database and artifacts folder (with ``overrides``, e.g. DISTILL_AUTH_CACHE_S="3600"); its cached
    settings and engine are dropped before and after."""
    from app import config, db, storage

    for name, value in {**env, **overrides}.items():
        if name.startswith("DISTILL_"):
            monkeypatch.setenv(name, value)
    caches = (config.get_settings, storage.get_storage, db.get_engine, db._session_factory, db._compiled_sql)
    for cache in caches:
        cache.cache_clear()
    try:
        yield
    finally:
        db.get_engine().dispose()
        for cache in caches:
            cache.cache_clear()


def create_api_key(env: dict, tenant: str) -> dict:
    """``distill-admin keys create --tenant`` against the database of ``env``: {"id", "tenant", "key"}."""
    result = subprocess.run([sys.executable, "-m", "app.admin", "keys", "create", "--tenant", tenant, "--json"],
                            cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def service_env(tmp_path_factory) -> dict:
    redis.Redis.from_url(REDIS_URL).ping()  # fail loudly if the real broker is not there
    database = f"distill_test_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{database}"')
    root = tmp_path_factory.mktemp("service")
    env = {
        **os.environ,
        "DISTILL_DATABASE_URL": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{database}",
        "DISTILL_BROKER_URL": REDIS_URL,
        "DISTILL_QUEUE": f"distill-test-{uuid.uuid4().hex[:8]}",
        "DISTILL_ARTIFACTS_DIR": str(root / "artifacts"),
        "DISTILL_DEVICE": "cpu",
        "DISTILL_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "DISTILL_CHECKPOINT_INTERVAL_S": "0",
        "DISTILL_MODELS_DIR": str(root / "server-models"),
        # Tests submit jobs faster than the workers finish them; the limit has tests of its own (test_auth.py).
        "DISTILL_TENANT_MAX_RUNNING_JOBS": "1000",
        "DISTILL_WEBHOOKS_ALLOW_PRIVATE": "1",  # the webhook tests' receivers listen on 127.0.0.1
        "DISTILL_WEBHOOK_RETRY_BASE_S": "0.5",  # retries in seconds, not minutes (still one reconciler pass apart)
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    (root / "server-models").mkdir()
    env["_LOGS"] = str(root)
    env["_API_KEY"] = create_api_key(env, "test")["key"]  # the tenant every `client` request acts as
    yield env
    _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def api_url(service_env) -> str:
    port = _free_port()
    process = _start([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
                     service_env, Path(service_env["_LOGS"]) / "api.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError("the API process exited: " + (Path(service_env["_LOGS"]) / "api.log").read_text())
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(healthy, 60, "the API")
    yield url
    _stop(process)


@pytest.fixture(scope="session")
def workers(service_env) -> list[subprocess.Popen]:
    """Two real worker processes, so a long job under test doesn't hold up the others."""
    processes, logs = [], []
    for n in range(2):
        log = Path(service_env["_LOGS"]) / f"worker{n}.log"
        logs.append(log)
        processes.append(_start([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                                 "--loglevel=INFO", "-n", f"test{n}-{uuid.uuid4().hex[:6]}@%h",
                                 "-Q", service_env["DISTILL_QUEUE"]], service_env, log))

    def ready() -> bool:
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                raise RuntimeError("a worker exited: " + log.read_text())
        return all(log.exists() and b"ready." in log.read_bytes() for log in logs)

    _wait_for(ready, 90, "the workers")
    yield processes
    for process in processes:
        _stop(process)


@pytest.fixture(scope="session")
def api_key(service_env) -> str:
    return service_env["_API_KEY"]


@pytest.fixture
def client(api_url, api_key) -> httpx.Client:
    with httpx.Client(base_url=api_url + "/v1", timeout=60, headers=bearer(api_key)) as http:
        yield http


@pytest.fixture(scope="session")
def problem(tmp_path_factory):
    from tests.factories import make_problem

    return make_problem(tmp_path_factory.mktemp("problem"))


@pytest.fixture(scope="session")
def language(tmp_path_factory):
    """A tiny GPT-2 teacher trained on a synthetic language, with its data (built once: it trains)."""
    from tests.factories import make_language_problem

    return make_language_problem(tmp_path_factory.mktemp("language"))


@pytest.fixture(scope="session")
def lm(api_url, api_key, workers, language) -> str:
    """A finished causal LM (1 layer derived from the language teacher, 1 epoch, trained by a worker): its model
    id. Shared by the inference tests (completions, chat, batching), which only read it."""
    from tests.app.helpers import submit, upload, wait_for

    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers=bearer(api_key)) as http:
        teacher, train = upload(http, language.teacher_archive, "model"), upload(http, language.train_jsonl, "dataset")
        body = {"task": "causal_lm", "teacher": {"file_id": teacher["id"]}, "student": {"derive": {"num_layers": 1}},
                "training_file": train["id"], "hyperparameters": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3},
                "data": {"max_length": 64}}
        job = wait_for(http, submit(http, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job["result_model_id"]
