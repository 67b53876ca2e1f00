"""Nobody in without a key, and no tenant sees another's files, jobs or models: API keys,
the cross-tenant matrix over every route, ``distill-admin``, Idempotency-Key, and the
per-tenant limits. Real stack: PostgreSQL, Redis, worker processes, uvicorn."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import psycopg2
import pytest
from fastapi.routing import iter_route_contexts

from tests.conftest import PG_HOST, PG_USER, ROOT, bearer, create_api_key

from .helpers import job_body, upload, upload_bytes, wait_for
from .stack import Stack

PUBLIC = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
          # the dashboard's pages need no key (they ask for one; their /v1 calls send it)
          "/dashboard", "/dashboard/", "/dashboard/jobs/{job_id}", "/dashboard/models", "/dashboard/models/{model_id}"}
ADMIN = Path(sys.executable).parent / "distill-admin"


def api_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, read from the app itself."""
    from app.main import app

    return sorted((method, context.path) for context in iter_route_contexts(app.routes)
                  for method in context.methods or () if method != "HEAD")


def problem_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body


def admin(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(ADMIN), *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check)


def database_rows_containing(env: dict, text: str) -> list[str]:
    """Every table of the service's database searched for ``text`` in any column."""
    database = env["DISTILL_DATABASE_URL"].rsplit("/", 1)[-1]
    connection = psycopg2.connect(host=PG_HOST, user=PG_USER, dbname=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            tables = [row[0] for row in cursor.fetchall()]
            hits = []
            for table in tables:
                cursor.execute(f'SELECT r::text FROM "{table}" AS r WHERE strpos(r::text, %s) > 0', (text,))
                hits += [f"{table}: {row[0]}" for row in cursor.fetchall()]
            return hits
    finally:
        connection.close()


def unique_tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ---- without a valid key -------------------------------------------------------------------------------------

def some_request(method: str, path: str) -> tuple[str, str]:
    return method, re.sub(r"\{(\w+)\}", lambda m: f"{m.group(1).split('_')[0]}-nope", path)


def test_every_route_but_health_and_docs_needs_a_key(api_url):
    routes = api_routes()
    assert {path for _, path in routes} >= PUBLIC - {"/docs/oauth2-redirect"}
    for method, path in routes:
        if path in PUBLIC:
            status = httpx.request(*some_request(method, api_url + path), follow_redirects=True).status_code
            # /readyz is 503 while no worker is alive (this test doesn't start them): public either way
            assert status in ((200, 503) if path == "/readyz" else (200,)), (path, status)
            continue
        response = httpx.request(*some_request(method, api_url + path), json={})
        body = problem_of(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
        assert body["code"] == "unauthorized" and body["param"] == "Authorization"


@pytest.mark.parametrize("authorization", [
    "Bearer dsk_" + "A" * 43,  # well-formed, unknown
    "Bearer not-a-key",
    "Bearer",
    "Basic dXNlcjpwYXNz",
    "dsk_" + "A" * 43,  # no scheme
])
def test_unknown_or_malformed_key_is_401(api_url, authorization):
    for path in ("/v1/files", "/v1/models", "/v1/distillation/jobs"):
        response = httpx.get(api_url + path, headers={"Authorization": authorization})
        assert problem_of(response, 401)["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_revoked_key_is_401_at_once(api_url, service_env):
    created = create_api_key(service_env, unique_tenant("revoked"))
    with httpx.Client(base_url=api_url + "/v1", headers=bearer(created["key"]), timeout=60) as http:
        assert http.get("/files").status_code == 200
        admin(service_env, "keys", "revoke", created["id"])
        response = http.get("/files")
        assert problem_of(response, 401)["code"] == "unauthorized"
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


# ---- distill-admin ----------------------------------------------------------------------------------------------

def test_admin_keys_create_list_revoke(api_url, service_env):
    tenant = unique_tenant("admin")
    created = admin(service_env, "keys", "create", "--tenant", tenant)
    fields = dict(line.split(None, 1) for line in created.stdout.splitlines())
    key, key_id = fields["key"], fields["id"]
    assert fields["tenant"] == tenant and key.startswith("dsk_") and key_id.startswith("key-")
    assert "only this once" in created.stderr

    listing = admin(service_env, "keys", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert tenant in row and row.split()[-1] == "-"  # not revoked
    as_json = json.loads(admin(service_env, "keys", "list", "--tenant", tenant, "--json").stdout)
    assert [(k["id"], k["tenant"], k["revoked_at"]) for k in as_json] == [(key_id, tenant, None)]
    assert key not in listing and key not in json.dumps(as_json)
    assert key[4:20] not in listing  # not even a piece of it

    # The database holds the key's sha256, never the key.
    assert database_rows_containing(service_env, key[4:]) == []
    assert len(database_rows_containing(service_env, hashlib.sha256(key.encode()).hexdigest())) == 1

    assert httpx.get(api_url + "/v1/files", headers=bearer(key)).status_code == 200
    revoked = admin(service_env, "keys", "revoke", key_id)
    assert revoked.stdout.startswith(f"revoked {key_id}")
    assert httpx.get(api_url + "/v1/files", headers=bearer(key)).status_code == 401
    assert admin(service_env, "keys", "revoke", key_id).stdout.startswith("already revoked")
    revoked_at = json.loads(admin(service_env, "keys", "list", "--tenant", tenant, "--json").stdout)[0]["revoked_at"]
    assert revoked_at is not None
    assert admin(service_env, "keys", "list").stdout.count(key_id) == 1

    unknown = admin(service_env, "keys", "revoke", "key-nope", check=False)
    assert unknown.returncode == 1 and "no key" in unknown.stderr
    bad_name = admin(service_env, "keys", "create", "--tenant", "two words", check=False)
    assert bad_name.returncode == 2 and "tenant" in bad_name.stderr


# ---- tenants see only their own objects ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenants(api_url, service_env):
    keys = {name: create_api_key(service_env, unique_tenant(name)) for name in ("alpha", "beta")}
    clients = {name: httpx.Client(base_url=api_url + "/v1", headers=bearer(k["key"]), timeout=60)
               for name, k in keys.items()}
    yield clients
    for http in clients.values():
        http.close()


@pytest.fixture(scope="module")
def alphas(tenants, workers, problem) -> dict:
    """Tenant alpha's file, finished job and model (ids that tenant beta must not reach)."""
    alpha = tenants["alpha"]
    teacher = upload(alpha, problem.teacher, "model")
    training = upload(alpha, problem.train_csv, "dataset")
    job = alpha.post("/distillation/jobs", json=job_body(teacher["id"], training["id"], epochs=2)).json()
    job = wait_for(alpha, job["id"])
    assert job["status"] == "succeeded", job["error"]
    webhook = alpha.post("/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]})
    assert webhook.status_code == 201, webhook.text
    return {"file_id": teacher["id"], "training_id": training["id"], "job_id": job["id"],
            "model_id": job["result_model_id"], "webhook_id": webhook.json()["id"]}


def cross_tenant_requests(ids: dict) -> dict:
    """(method, path) → the request tenant beta makes with ``ids`` (alpha's, or unknown ones).
    Every route must be here: a new route fails the matrix until it says how it is scoped."""
    f, j, m, w = ids["file_id"], ids["job_id"], ids["model_id"], ids["webhook_id"]
    body = job_body(f, ids["training_id"])
    return {
        ("POST", "/v1/files"): None,  # creates; no id to reach (its Idempotency-Key scope is tested below)
        ("GET", "/v1/files"): ("GET", "/files", {"params": {"limit": 100}}),
        ("GET", "/v1/files/{file_id}"): ("GET", f"/files/{f}", {}),
        ("GET", "/v1/files/{file_id}/content"): ("GET", f"/files/{f}/content", {}),
        ("DELETE", "/v1/files/{file_id}"): ("DELETE", f"/files/{f}", {}),
        ("POST", "/v1/distillation/jobs"): ("POST", "/distillation/jobs", {"json": body}),
        ("GET", "/v1/distillation/jobs"): ("GET", "/distillation/jobs", {"params": {"limit": 100}}),
        ("GET", "/v1/distillation/jobs/{job_id}"): ("GET", f"/distillation/jobs/{j}", {}),
        ("POST", "/v1/distillation/jobs/{job_id}/cancel"): ("POST", f"/distillation/jobs/{j}/cancel", {}),
        ("DELETE", "/v1/distillation/jobs/{job_id}"): ("DELETE", f"/distillation/jobs/{j}", {}),
        ("GET", "/v1/distillation/jobs/{job_id}/events"): ("GET", f"/distillation/jobs/{j}/events", {}),
        ("GET", "/v1/models"): ("GET", "/models", {"params": {"limit": 100}}),
        ("GET", "/v1/models/{model_id}"): ("GET", f"/models/{m}", {}),
        ("GET", "/v1/models/{model_id}/download"): ("GET", f"/models/{m}/download", {}),
        ("POST", "/v1/models/{model_id}/predict"): ("POST", f"/models/{m}/predict", {"json": {"inputs": [[0.0] * 8]}}),
        ("DELETE", "/v1/models/{model_id}"): ("DELETE", f"/models/{m}", {}),
        ("POST", "/v1/completions"): ("POST", "/completions", {"json": {"model": m, "prompt": "hi"}}),
        ("POST", "/v1/chat/completions"): ("POST", "/chat/completions",
                                           {"json": {"model": m, "messages": [{"role": "user", "content": "hi"}]}}),
        ("POST", "/v1/distillation/jobs/estimate"): ("POST", "/distillation/jobs/estimate", {"json": body}),
        ("GET", "/v1/models/{model_id}/report"): ("GET", f"/models/{m}/report", {}),
        ("POST", "/v1/webhooks"): None,  # creates; no id to reach
        ("GET", "/v1/webhooks"): ("GET", "/webhooks", {"params": {"limit": 100}}),
        ("GET", "/v1/webhooks/{webhook_id}"): ("GET", f"/webhooks/{w}", {}),
        ("DELETE", "/v1/webhooks/{webhook_id}"): ("DELETE", f"/webhooks/{w}", {}),
        ("GET", "/v1/webhooks/{webhook_id}/deliveries"): ("GET", f"/webhooks/{w}/deliveries", {}),
    }


def test_another_tenants_ids_answer_like_unknown_ones_on_every_route(tenants, alphas):
    alpha, beta = tenants["alpha"], tenants["beta"]
    unknown = {"file_id": "file-" + "0" * 24, "training_id": "file-" + "1" * 24, "job_id": "job-" + "0" * 24,
               "model_id": "model-" + "0" * 24, "webhook_id": "whep-" + "0" * 24}
    theirs, nowhere = cross_tenant_requests(alphas), cross_tenant_requests(unknown)
    assert set(theirs) == {route for route in api_routes() if route[1] not in PUBLIC}
    for route, request in theirs.items():
        if request is None:
            continue
        method, path, options = request
        response = beta.request(method, path, **options)
        if method == "GET" and "{" not in route[1]:  # a list: none of alpha's objects in it
            assert response.status_code == 200, (route, response.text)
            assert not {item["id"] for item in response.json()["data"]} & set(alphas.values()), route
            continue
        baseline = beta.request(*nowhere[route][:2], **nowhere[route][2])
        assert response.status_code == baseline.status_code, (route, response.text, baseline.text)
        got, expected = response.json(), baseline.json()
        assert (got["code"], got["param"]) == (expected["code"], expected["param"]), route
        for name, value in alphas.items():  # the same words, but for the id
            got["detail"] = got["detail"].replace(value, unknown[name])
        assert got["detail"] == expected["detail"], route
        if "{" in route[1]:
            assert response.status_code == 404, route
    # alpha's objects are real, and beta's attempts changed nothing
    assert alpha.get(f"/files/{alphas['file_id']}").status_code == 200
    assert alpha.get(f"/distillation/jobs/{alphas['job_id']}").json()["status"] == "succeeded"
    assert alpha.get(f"/models/{alphas['model_id']}/download").status_code == 200
    assert alpha.post(f"/models/{alphas['model_id']}/predict", json={"inputs": [[0.0] * 8]}).status_code == 200


@pytest.mark.parametrize("path, name", [
    ("/models", "model_id"),
    ("/files", "file_id"),
    ("/distillation/jobs", "job_id"),
    ("/webhooks", "webhook_id"),
])
def test_paging_after_another_tenants_id_is_like_an_unknown_id(tenants, alphas, path, name):
    theirs = tenants["beta"].get(path, params={"after": alphas[name]})
    nowhere = tenants["beta"].get(path, params={"after": name.split("_")[0] + "-" + "0" * 24})
    assert (theirs.status_code, nowhere.status_code) == (422, 422)


def test_idempotency_keys_belong_to_a_tenant(tenants):
    key = {"Idempotency-Key": f"shared-{uuid.uuid4().hex}"}
    first = upload_bytes_with(tenants["alpha"], b"a,b\n1,2\n", "mine.csv", key)
    other = upload_bytes_with(tenants["beta"], b"c,d\n3,4\n", "theirs.csv", key)
    assert first.status_code == other.status_code == 201, other.text
    assert first.json()["id"] != other.json()["id"]


# ---- Idempotency-Key ---------------------------------------------------------------------------------------------

def upload_bytes_with(http: httpx.Client, content: bytes, filename: str, headers: dict,
                      purpose: str = "dataset") -> httpx.Response:
    return http.post("/files", files={"file": (filename, content)}, data={"purpose": purpose}, headers=headers)


def listed_ids(http: httpx.Client, path: str) -> list[str]:
    return [item["id"] for item in http.get(path, params={"limit": 100}).json()["data"]]


def test_a_repeated_upload_replays_the_first_response(client):
    headers = {"Idempotency-Key": f"upload-{uuid.uuid4().hex}"}
    first = upload_bytes_with(client, b"x,y\n1,2\n3,4\n", "same.csv", headers)
    again = upload_bytes_with(client, b"x,y\n1,2\n3,4\n", "same.csv", headers)
    assert first.status_code == again.status_code == 201, again.text
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert listed_ids(client, "/files").count(first.json()["id"]) == 1

    other = upload_bytes_with(client, b"x,y\n5,6\n", "same.csv", headers)
    body = problem_of(other, 422)
    assert body["param"] == "Idempotency-Key" and "Idempotency-Key" in body["detail"]
    assert problem_of(upload_bytes_with(client, b"x,y\n1,2\n3,4\n", "same.csv", headers, purpose="model"),
                      422)["param"] == "Idempotency-Key"
    too_long = upload_bytes_with(client, b"x\n1\n", "a.csv", {"Idempotency-Key": "k" * 256})
    assert problem_of(too_long, 422)["param"] == "Idempotency-Key"


def test_a_failed_request_does_not_use_up_its_key(client):
    headers = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    problem_of(upload_bytes_with(client, b"a,b\n1,oops\n", "bad.csv", headers), 422)
    assert upload_bytes_with(client, b"a,b\n1,2\n", "good.csv", headers).status_code == 201


def test_a_repeated_job_submit_replays_the_first_response(client, problem):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    body = job_body(teacher["id"], training["id"], epochs=1)
    headers = {"Idempotency-Key": f"job-{uuid.uuid4().hex}"}
    first = client.post("/distillation/jobs", json=body, headers=headers)
    again = client.post("/distillation/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 201, again.text
    assert again.json() == first.json()
    assert listed_ids(client, "/distillation/jobs").count(first.json()["id"]) == 1
    body["hyperparameters"]["epochs"] = 2
    assert problem_of(client.post("/distillation/jobs", json=body, headers=headers), 422)["param"] == "Idempotency-Key"


def concurrently(count: int, send) -> list[httpx.Response]:
    """``count`` requests released at once from a barrier."""
    barrier, responses = threading.Barrier(count), [None] * count

    def one(index: int) -> None:
        barrier.wait()
        responses[index] = send()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def assert_one_object(responses: list[httpx.Response]) -> str:
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409} and 201 in statuses, [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            body = problem_of(response, 409)
            assert body["param"] == "Idempotency-Key" and response.headers["retry-after"]
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1, ids
    return ids.pop()


def test_concurrent_duplicates_create_one_object(api_url, service_env, problem):
    # a tenant of its own, so its listings hold exactly what this test created
    key = create_api_key(service_env, unique_tenant("concurrent"))["key"]
    headers = {**bearer(key), "Idempotency-Key": f"burst-{uuid.uuid4().hex}"}
    content = problem.train_csv.read_bytes()

    def send_upload() -> httpx.Response:
        return httpx.post(api_url + "/v1/files", files={"file": ("burst.csv", content)}, data={"purpose": "dataset"},
                          headers=headers, timeout=60)

    file_id = assert_one_object(concurrently(8, send_upload))
    with httpx.Client(base_url=api_url + "/v1", headers=bearer(key), timeout=60) as http:
        assert listed_ids(http, "/files") == [file_id]
        teacher = upload(http, problem.teacher, "model")
        body = job_body(teacher["id"], file_id, epochs=1)
        job_headers = {**bearer(key), "Idempotency-Key": f"burst-job-{uuid.uuid4().hex}"}
        job_id = assert_one_object(concurrently(8, lambda: httpx.post(api_url + "/v1/distillation/jobs", json=body,
                                                                      headers=job_headers, timeout=60)))
        assert listed_ids(http, "/distillation/jobs") == [job_id]
        # once the first finished, a duplicate is a replay, never a second object
        replay = httpx.post(api_url + "/v1/distillation/jobs", json=body, headers=job_headers, timeout=60)
        assert replay.status_code == 201 and replay.json()["id"] == job_id
        http.post(f"/distillation/jobs/{job_id}/cancel")


# ---- per-tenant limits ---------------------------------------------------------------------------------------------

MAX_JOBS = 2
ROOM_LEFT = 1000  # bytes of storage left after the teacher and the training set


@pytest.fixture(scope="module")
def limited(service_env, problem, tmp_path_factory):
    """An API of its own with small tenant limits (same database), on a queue no worker reads, so
    jobs stay queued; and a tenant of its own."""
    storage_limit = problem.teacher.stat().st_size + problem.train_csv.stat().st_size + ROOM_LEFT
    with Stack(service_env, tmp_path_factory.mktemp("limits-logs"), DISTILL_TENANT_MAX_RUNNING_JOBS=str(MAX_JOBS),
               DISTILL_TENANT_MAX_STORAGE_BYTES=str(storage_limit)) as stack:  # no worker: jobs stay queued
        key = create_api_key(service_env, unique_tenant("limited"))["key"]
        with httpx.Client(base_url=stack.url + "/v1", headers=bearer(key), timeout=60) as http:
            teacher, training = upload(http, problem.teacher, "model"), upload(http, problem.train_csv, "dataset")
            yield {"client": http, "url": stack.url, "key": key, "storage_limit": storage_limit,
                   "job": job_body(teacher["id"], training["id"], epochs=1)}
            for job_id in listed_ids(http, "/distillation/jobs"):
                http.post(f"/distillation/jobs/{job_id}/cancel")


def test_storage_limit_is_413_naming_it(limited, problem):
    http, limit = limited["client"], limited["storage_limit"]
    before = listed_ids(http, "/files")
    over = problem_of(upload_bytes(http, b"v\n" + b"1\n" * ROOM_LEFT, "over.csv", "dataset"), 413)
    assert over["code"] == "storage_limit_exceeded" and over["limit"] == limit
    assert "DISTILL_TENANT_MAX_STORAGE_BYTES" in over["detail"] and str(limit) in over["detail"]
    assert listed_ids(http, "/files") == before

    # Uploads that each fit alone but no two together, sent at once: exactly one is kept.
    most_of_the_room = b"v\n" + b"1\n" * (ROOM_LEFT // 2 - 10)

    def send() -> httpx.Response:
        return httpx.post(limited["url"] + "/v1/files", headers=bearer(limited["key"]), data={"purpose": "dataset"},
                          files={"file": ("most.csv", most_of_the_room)}, timeout=60)

    responses = concurrently(4, send)
    assert sorted(r.status_code for r in responses) == [201, 413, 413, 413], [r.text for r in responses]
    total = sum(f["bytes"] for f in http.get("/files", params={"limit": 100}).json()["data"])
    assert total <= limit


def test_running_jobs_limit_is_429_with_retry_after(limited):
    http, body = limited["client"], limited["job"]
    jobs = [http.post("/distillation/jobs", json=body) for _ in range(MAX_JOBS)]
    assert [r.status_code for r in jobs] == [201] * MAX_JOBS, [r.text for r in jobs]
    refused = http.post("/distillation/jobs", json=body)
    problem = problem_of(refused, 429)
    assert problem["code"] == "too_many_running_jobs" and problem["limit"] == MAX_JOBS
    assert "DISTILL_TENANT_MAX_RUNNING_JOBS" in problem["detail"]
    assert int(refused.headers["retry-after"]) > 0

    # A cancelled job frees its slot; racing submits for that one slot: one gets it.
    assert http.post(f"/distillation/jobs/{jobs[0].json()['id']}/cancel").status_code == 200
    responses = concurrently(4, lambda: httpx.post(limited["url"] + "/v1/distillation/jobs", json=body,
                                                   headers=bearer(limited["key"]), timeout=60))
    assert sorted(r.status_code for r in responses) == [201, 429, 429, 429], [r.text for r in responses]
    active = http.get("/distillation/jobs", params={"status": "queued", "limit": 100}).json()["data"]
    assert len(active) == MAX_JOBS
