"""The create path (issue 9): one transaction and one broker publish per submit, indexed reads, and
a consistent state when the publish fails. Real PostgreSQL, real Redis, real HTTP.

- migration 0006's indexes exist after ``alembic upgrade head`` and go with its downgrade;
- a submit publishes exactly one message (a replayed Idempotency-Key none), naming its job;
- in one API process (``TestClient`` in a subprocess with the service's settings): a submit commits
  once (twice with an Idempotency-Key: the claim, then the job with its recorded response), reads
  the files it names in one query the first time and from the process's cache after, and a GET is
  one statement in autocommit (the job with its queue position);
- a file deleted by another process is not taken from that cache;
- queue positions are consecutive for jobs submitted one after the other;
- a submit whose publish fails: 503, the job is ``failed`` with ``queue_unavailable`` and both
  events, and the Idempotency-Key is free again (a retry is not a replay of a 201 nobody got).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import httpx
import psycopg2
import pytest
import redis

from tests.conftest import PG_HOST, PG_USER, ROOT, _admin, bearer, create_api_key

from .helpers import events, job_body, upload
from .stack import Stack

INDEXES = {("jobs", "ix_jobs_status_created_at_id"), ("jobs", "ix_jobs_tenant_id_status"),
           ("jobs", "ix_jobs_tenant_id_created_at_id"), ("job_events", "ix_job_events_job_id_id")}


def _indexes(database: str) -> set[tuple[str, str]]:
    connection = psycopg2.connect(host=PG_HOST, user=PG_USER, dbname=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'")
            return set(cursor.fetchall())
    finally:
        connection.close()


def test_migration_0006_adds_the_read_indexes_and_removes_them_on_downgrade(service_env):
    name = f"distill_idx_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    env = {**service_env, "DISTILL_DATABASE_URL": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{name}"}

    def alembic(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    try:
        alembic("upgrade", "head")
        assert INDEXES <= _indexes(name)
        alembic("downgrade", "0005")
        assert not INDEXES & _indexes(name)
        alembic("upgrade", "head")
        assert INDEXES <= _indexes(name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def quiet_stack(service_env, problem, tmp_path_factory):
    """An API of its own on a queue no worker reads (jobs stay queued, messages stay in Redis), a tenant
    of its own, and its teacher and training set uploaded."""
    with Stack(service_env, tmp_path_factory.mktemp("create-path-logs")) as stack:
        tenant = f"create-path-{uuid.uuid4().hex[:8]}"
        key = create_api_key(service_env, tenant)["key"]
        with httpx.Client(base_url=stack.url + "/v1", headers=bearer(key), timeout=60) as http:
            teacher, training = upload(http, problem.teacher, "model"), upload(http, problem.train_csv, "dataset")
            yield {"stack": stack, "client": http, "key": key, "tenant": tenant,
                   "body": job_body(teacher["id"], training["id"], epochs=1)}
            for job in http.get("/distillation/jobs", params={"limit": 100}).json()["data"]:
                http.post(f"/distillation/jobs/{job['id']}/cancel")


def _published_job_ids(env: dict) -> list[str]:
    """The job ids of the run_job messages waiting in the queue's Redis lists (oldest first)."""
    broker = redis.Redis.from_url(env["DISTILL_BROKER_URL"])
    ids = []
    for name in sorted(broker.keys(env["DISTILL_QUEUE"] + "*")):
        for raw in reversed(broker.lrange(name, 0, -1)):  # LPUSH: the newest first in the list
            message = json.loads(raw)
            assert message["headers"]["task"] == "distill.run_job"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


def test_one_submit_is_one_publish_and_a_replay_is_none(quiet_stack):
    http, env = quiet_stack["client"], quiet_stack["stack"].env
    before = _published_job_ids(env)
    plain = [http.post("/distillation/jobs", json=quiet_stack["body"]) for _ in range(3)]
    assert [r.status_code for r in plain] == [201] * 3, [r.text for r in plain]
    headers = {"Idempotency-Key": f"once-{uuid.uuid4().hex}"}
    keyed = [http.post("/distillation/jobs", json=quiet_stack["body"], headers=headers) for _ in range(2)]
    assert [r.status_code for r in keyed] == [201, 201] and keyed[1].headers["idempotent-replayed"] == "true"
    assert keyed[0].json()["id"] == keyed[1].json()["id"]
    new = _published_job_ids(env)[len(before):]
    assert new == [r.json()["id"] for r in plain] + [keyed[0].json()["id"]]


def test_queue_positions_are_consecutive_and_a_get_agrees_with_the_listing(quiet_stack):
    http = quiet_stack["client"]
    first, second = (http.post("/distillation/jobs", json=quiet_stack["body"]).json() for _ in range(2))
    assert first["queue_position"] >= 1 and second["queue_position"] >= 1
    listed = {j["id"]: j["queue_position"] for j in http.get("/distillation/jobs", params={"limit": 100}).json()["data"]}
    assert listed[second["id"]] == listed[first["id"]] + 1
    got = http.get(f"/distillation/jobs/{second['id']}").json()
    assert got["status"] == "queued" and got["queue_position"] == listed[second["id"]]
    assert http.post(f"/distillation/jobs/{first['id']}/cancel").status_code == 200
    assert http.get(f"/distillation/jobs/{first['id']}").json()["queue_position"] is None
    assert http.get(f"/distillation/jobs/{second['id']}").json()["queue_position"] == listed[first["id"]]


def test_the_hot_paths_answer_as_the_full_routes(quiet_stack, service_env):
    """A create and a GET from a key the API process has not seen take the full FastAPI routes (which
    authenticate it); the same requests again take the hot paths (``api.hot``). Same answers; and a
    hot path hands what it does not handle (an unknown or another tenant's job, an invalid body) to
    the full route's documented error."""
    base, env = quiet_stack["stack"].url + "/v1", quiet_stack["stack"].env

    def fresh_client() -> httpx.Client:  # a key of the fixture's tenant that this API process never saw
        return httpx.Client(base_url=base, headers=bearer(create_api_key(env, quiet_stack["tenant"])["key"]),
                            timeout=60)

    with fresh_client() as http:
        full = http.post("/distillation/jobs", json=quiet_stack["body"])
        hot = http.post("/distillation/jobs", json=quiet_stack["body"])
    assert full.status_code == hot.status_code == 201, (full.text, hot.text)
    assert full.headers["content-type"] == hot.headers["content-type"] == "application/json"
    full, hot = full.json(), hot.json()
    assert hot["queue_position"] == full["queue_position"] + 1
    differ = {"id", "created_at", "queue_position"}
    assert {k: v for k, v in hot.items() if k not in differ} == {k: v for k, v in full.items() if k not in differ}
    with fresh_client() as http:
        read_full, read_hot = (http.get(f"/distillation/jobs/{full['id']}") for _ in range(2))
        assert read_full.status_code == read_hot.status_code == 200
        assert read_full.content == read_hot.content  # byte for byte
        assert read_hot.json() == full  # what the create answered, still queued at the same place
        missing = http.get("/distillation/jobs/job-doesnotexist")
        assert missing.status_code == 404 and missing.json()["param"] == "job_id", missing.text
        invalid = http.post("/distillation/jobs", json={**quiet_stack["body"], "hyperparameters": {"epochs": 0}})
        assert invalid.status_code == 422 and "epochs" in invalid.json()["param"], invalid.text
        # a check that fails on the hot path (both files cached): the app's handler writes the problem
        mismatch = http.post("/distillation/jobs", json={**quiet_stack["body"],
                                                         "training_file": quiet_stack["body"]["teacher"]["file_id"]})
        assert mismatch.status_code == 422 and mismatch.json()["param"] == "training_file", mismatch.text
        assert mismatch.headers["content-type"].startswith("application/problem+json")
    other_tenant = create_api_key(env, f"other-{uuid.uuid4().hex[:8]}")["key"]
    with httpx.Client(base_url=base, headers=bearer(other_tenant), timeout=60) as http:
        for _ in range(2):  # the second time with its key cached: the hot path
            theirs = http.get(f"/distillation/jobs/{full['id']}")
            assert theirs.status_code == 404 and theirs.json()["param"] == "job_id", theirs.text


COUNT_SCRIPT = r'''
import json, sys, uuid
from fastapi.testclient import TestClient
from sqlalchemy import event
from app.main import app
from app.db import get_engine
import app.services.jobs as jobs_service

key, body = sys.argv[1], sys.argv[2]
statements, commits = [], []
engine = get_engine()
event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
event.listen(engine, "commit", lambda conn: commits.append(1))
read_row = jobs_service.read_row  # a GET's one statement goes straight to the driver (autocommit): counted here
jobs_service.read_row = lambda statement, params: statements.append("READ_ROW " + str(statement)) or read_row(
    statement, params)
out = {}
with TestClient(app) as http:
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    # warm: the API key is looked up once, expired idempotency keys are swept (once a minute), the files are read
    for name, extra in (("warm", {"Idempotency-Key": str(uuid.uuid4())}), ("plain", {}),
                        ("keyed", {"Idempotency-Key": str(uuid.uuid4())})):
        statements.clear(); commits.clear()
        created = http.post("/v1/distillation/jobs", content=body, headers={**headers, **extra})
        assert created.status_code == 201, created.text
        out[name] = {"statements": list(statements), "commits": len(commits)}
    statements.clear(); commits.clear()
    got = http.get("/v1/distillation/jobs/" + created.json()["id"], headers=headers)
    assert got.status_code == 200 and got.json()["queue_position"] >= 1, got.text
    out["get"] = {"statements": list(statements), "commits": len(commits)}
print("RESULT " + json.dumps(out))
'''


def test_a_submit_is_one_transaction_and_reads_its_files_once_per_process(quiet_stack):
    env = quiet_stack["stack"].env
    result = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, quiet_stack["key"], json.dumps(quiet_stack["body"])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    warm, plain, keyed, get = counts["warm"], counts["plain"], counts["keyed"], counts["get"]
    assert plain["commits"] == 1 and keyed["commits"] == 2, (plain, keyed)
    # the first submit reads the files it names in one query; later ones find them in the process's cache
    assert sum("FROM files" in s for s in warm["statements"]) == 1, warm["statements"]
    for create in (plain, keyed):
        assert not any("FROM files" in s for s in create["statements"]), create["statements"]
        assert sum(s.startswith("INSERT INTO jobs") for s in create["statements"]) == 1
        assert sum(s.startswith("INSERT INTO job_events") for s in create["statements"]) == 1
        assert any("pg_advisory_xact_lock" in s for s in create["statements"])  # the quota is still locked
    # a GET is one statement in autocommit: no transaction to commit
    assert len(get["statements"]) == 1 and get["statements"][0].startswith("READ_ROW"), get
    assert get["commits"] == 0, get


CACHED_SUBMIT_SCRIPT = r'''
import json, sys
from fastapi.testclient import TestClient
from app.main import app

key, body = sys.argv[1], sys.argv[2]
with TestClient(app) as http:
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    first = http.post("/v1/distillation/jobs", content=body, headers=headers)
    print("FIRST " + json.dumps({"status": first.status_code, "body": first.json()}), flush=True)
    sys.stdin.readline()  # the file is deleted by another process meanwhile
    second = http.post("/v1/distillation/jobs", content=body, headers=headers)
    print("SECOND " + json.dumps({"status": second.status_code, "body": second.json()}), flush=True)
'''


def test_a_file_deleted_by_another_process_is_not_taken_from_the_cache(quiet_stack, problem):
    """An API process that checked a submit against a file keeps the file's metadata; when another
    process deletes the file, the next submit naming it is refused at once (the marker file), not
    after the cache's TTL (made long here, so that only the marker can explain the refusal)."""
    http = quiet_stack["client"]
    teacher, training = upload(http, problem.teacher, "model"), upload(http, problem.train_csv, "dataset")
    body = json.dumps(job_body(teacher["id"], training["id"], epochs=1))
    env = {**quiet_stack["stack"].env, "DISTILL_FILE_CACHE_S": "3600"}
    other = subprocess.Popen([sys.executable, "-c", CACHED_SUBMIT_SCRIPT, quiet_stack["key"], body], cwd=ROOT,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(other.stdout.readline().removeprefix("FIRST "))
        assert first["status"] == 201, first
        assert http.post(f"/distillation/jobs/{first['body']['id']}/cancel").status_code == 200
        assert http.delete(f"/files/{training['id']}").status_code == 200  # by the Stack's API process
        other.stdin.write("go\n")
        other.stdin.flush()
        second = json.loads(other.stdout.readline().removeprefix("SECOND "))
    finally:
        out, err = other.communicate(timeout=60)
    assert second["status"] == 422, (second, err[-2000:])
    assert second["body"]["param"] == "training_file" and "no file" in second["body"]["detail"]


def test_a_submit_whose_publish_fails_leaves_a_failed_job_and_a_free_key(service_env, problem, tmp_path):
    # a broker address nothing listens on: uploads work (no broker needed), the publish cannot
    with Stack(service_env, tmp_path, DISTILL_BROKER_URL="redis://127.0.0.1:9/0") as stack:
        key = create_api_key(service_env, f"no-broker-{uuid.uuid4().hex[:8]}")["key"]
        with httpx.Client(base_url=stack.url + "/v1", headers=bearer(key), timeout=120) as http:
            teacher, training = upload(http, problem.teacher, "model"), upload(http, problem.train_csv, "dataset")
            body = job_body(teacher["id"], training["id"], epochs=1)
            headers = {"Idempotency-Key": f"no-broker-{uuid.uuid4().hex}"}
            refused = http.post("/distillation/jobs", json=body, headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            jobs = http.get("/distillation/jobs").json()["data"]
            assert len(jobs) == 1 and jobs[0]["id"] in refused.json()["detail"]
            job = jobs[0]
            assert job["status"] == "failed" and job["error"]["code"] == "queue_unavailable"
            assert job["queue_position"] is None and job["finished_at"] is not None
            stages = [e["data"].get("stage") for e in events(http, job["id"]) if e["type"] == "stage"]
            assert stages == ["queued", "failed"]
            again = http.post("/distillation/jobs", json=body, headers=headers)  # not a replay, not "in flight"
            assert again.status_code == 503 and "idempotent-replayed" not in again.headers, again.text
            assert len(http.get("/distillation/jobs").json()["data"]) == 2
