"""The /predict hot path's caches never serve what the database no longer allows: a revoked key is
refused at once (in the revoking process, and in other processes through the marker file), an
unknown key is never cached, a deleted model is never answered from the cache (in this process or
another), and the hot path answers exactly what the full route answers.

In-process tests call the services against the session's PostgreSQL database; the end-to-end ones
use the live API (and a second API process of their own), a real worker and a real model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, app_in_process, bearer, create_api_key

from .helpers import upload, wait_for, job_body, submit
from .stack import Stack


# ---- the cache alone -----------------------------------------------------------------------------------------

def test_ttl_cache_expires_bounds_and_refuses_answers_older_than_a_signal(tmp_path):
    from app.services.hot_cache import TtlCache, bump_marker

    now = [0.0]
    marker = tmp_path / "marker"
    cache = TtlCache(10, max_entries=2, marker=marker, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 9.9
    assert cache.get("a") == 1
    now[0] = 10.0
    assert cache.get("a") is None  # expired
    cache.put("a", 1), cache.put("b", 2), cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, 2, 3)  # the oldest went first

    bump_marker(marker)  # another process signals a change
    assert cache.get("b") is None and len(cache) == 0
    generation = cache.generation()  # a lookup starts...
    bump_marker(marker)  # ...a revoke commits while it runs...
    cache.put("b", 2, generation=generation)  # ...so its answer is not kept
    assert cache.get("b") is None
    cache.put("b", 2, generation=cache.generation())
    assert cache.get("b") == 2
    assert TtlCache(0).get("x") is None  # off


def test_single_flight_shares_one_call_and_its_error():
    from app.services.hot_cache import single_flight

    calls = []

    async def lookup(value):
        calls.append(value)
        await asyncio.sleep(0.05)
        if value == "bad":
            raise LookupError(value)
        return value.upper()

    async def main():
        good = await asyncio.gather(*(single_flight("k1", lookup, "good") for _ in range(5)))
        bad = await asyncio.gather(*(single_flight("k2", lookup, "bad") for _ in range(3)), return_exceptions=True)
        again = await single_flight("k1", lookup, "good")  # finished flights are not reused
        return good, bad, again

    good, bad, again = asyncio.run(main())
    assert good == ["GOOD"] * 5 and again == "GOOD"
    assert all(isinstance(e, LookupError) for e in bad)
    assert calls == ["good", "bad", "good"]


# ---- keys, in process --------------------------------------------------------------------------------------------

@pytest.fixture
def in_process(service_env, monkeypatch):
    """The app's settings and engine pointed at the test service's database and artifacts folder, with
    an hour-long key cache: whatever refuses a revoked key below, it is not the cache expiring."""
    with app_in_process(service_env, monkeypatch, DISTILL_AUTH_CACHE_S="3600"):
        yield service_env


def new_key(tenant: str = "cache-test") -> tuple[str, str]:
    from app.db import session_scope
    from app.services import api_keys

    with session_scope() as session:
        row, plain = api_keys.create_key(session, tenant)
        return row.id, plain


def test_a_cached_key_revoked_in_this_process_is_refused_at_once(in_process):
    from app.db import session_scope
    from app.services import api_keys

    key_id, key = new_key()
    assert api_keys.cached_tenant(key) is None  # never seen
    assert asyncio.run(api_keys.tenant_of(key)) == "cache-test"
    assert api_keys.cached_tenant(key) == "cache-test"  # now answered from memory
    with session_scope() as session:
        api_keys.revoke_key(session, key_id)
    assert api_keys.cached_tenant(key) is None
    assert asyncio.run(api_keys.tenant_of(key)) is None


def test_an_unknown_or_malformed_key_is_refused_and_never_cached(in_process):
    from app.services import api_keys

    for key in ("dsk_" + "A" * 43, "dsk_short", "not a key"):
        for _ in range(2):
            assert asyncio.run(api_keys.tenant_of(key)) is None
            assert api_keys.cached_tenant(key) is None
    assert len(api_keys._key_cache()) == 0


def test_a_key_revoked_by_another_process_is_refused_at_the_next_lookup(in_process):
    from app.services import api_keys

    key_id, key = new_key()
    assert asyncio.run(api_keys.tenant_of(key)) == "cache-test" and api_keys.cached_tenant(key) == "cache-test"
    subprocess.run([sys.executable, "-m", "app.admin", "keys", "revoke", key_id], cwd=ROOT, env=in_process,
                   check=True, capture_output=True)
    assert api_keys.cached_tenant(key) is None  # the CLI's marker emptied this process's cache
    assert asyncio.run(api_keys.tenant_of(key)) is None


# ---- end to end --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_id(api_url, api_key, workers, problem) -> str:
    with httpx.Client(base_url=api_url + "/v1", headers=bearer(api_key), timeout=120) as client:
        teacher = upload(client, problem.teacher, "model")
        training = upload(client, problem.train_csv, "dataset")
        job = wait_for(client, submit(client, job_body(teacher["id"], training["id"], epochs=1))["id"])
        assert job["status"] == "succeeded", job["error"]
        return job["result_model_id"]


def test_the_hot_path_answers_what_the_full_route_answers(client, model_id, problem):
    rows = problem.val_x[:3].tolist()
    first = client.post(f"/models/{model_id}/predict", json={"inputs": rows})  # may be a miss: the full route
    second = client.post(f"/models/{model_id}/predict", json={"inputs": rows})  # cached key and model
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.headers["content-type"] == second.headers["content-type"] == "application/json"
    assert first.json() == second.json() and second.json()["model"] == model_id
    assert len(second.json()["predictions"]) == 3
    # with key and model cached, a bad body still gets the full route's answer, naming the field
    for body, param in (({"inputs": []}, "inputs"), ({"inputs": [rows[0][:3]]}, "inputs[0]"),
                        ({"inputs": [rows[0]], "extra": 1}, "extra")):
        response = client.post(f"/models/{model_id}/predict", json=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert param in response.json()["param"], response.text
    broken = client.post(f"/models/{model_id}/predict", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and broken.headers["content-type"].startswith("application/problem+json")
    deep = client.post(f"/models/{model_id}/predict", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert deep.status_code in (400, 422) and deep.headers["content-type"].startswith("application/problem+json")


def test_a_revoked_key_is_refused_on_the_hot_path(api_url, service_env, model_id, problem):
    created = create_api_key(service_env, "test")  # the tenant that owns the model
    row = problem.val_x[:1].tolist()
    with httpx.Client(base_url=api_url + "/v1", headers=bearer(created["key"]), timeout=60) as http:
        for _ in range(2):  # the second is answered from the caches
            assert http.post(f"/models/{model_id}/predict", json={"inputs": row}).status_code == 200
        subprocess.run([sys.executable, "-m", "app.admin", "keys", "revoke", created["id"]], cwd=ROOT,
                       env=service_env, check=True, capture_output=True)
        response = http.post(f"/models/{model_id}/predict", json={"inputs": row})
        assert response.status_code == 401, response.text
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_a_deleted_model_is_not_served_from_any_process_cache(client, service_env, workers, problem, tmp_path):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = wait_for(client, submit(client, job_body(teacher["id"], training["id"], epochs=1))["id"])
    assert job["status"] == "succeeded", job["error"]
    doomed = job["result_model_id"]
    row = problem.val_x[:1].tolist()
    with Stack(service_env, Path(tmp_path)) as other:  # a second API process on the same database and storage
        for http in (client, other.client, client, other.client):  # both processes have it cached and loaded
            assert http.post(f"/models/{doomed}/predict", json={"inputs": row}).status_code == 200
        assert client.delete(f"/models/{doomed}").status_code == 200
        for http in (client, other.client):  # deleted here (cache dropped) and there (its weights are gone)
            response = http.post(f"/models/{doomed}/predict", json={"inputs": row})
            assert response.status_code == 404 and response.json()["param"] == "model_id", response.text
