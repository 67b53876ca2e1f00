"""Webhooks: signed job events delivered by the workers, retried with backoff, every attempt logged.

Unit tests for the URL check, the signature and the retry schedule; the rest against the live stack
(PostgreSQL, Redis, two real worker processes, uvicorn) with a real HTTP receiver on 127.0.0.1 (the
test stack sets DISTILL_WEBHOOKS_ALLOW_PRIVATE=1). Signatures are checked with the third-party
``standardwebhooks`` verifier, not with our own code."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psycopg2
import pytest
from standardwebhooks import Webhook

from app.config import Settings
from app.services import webhooks
from app.services.webhooks import RETRY_MULTIPLIERS, UrlRefused, check_url, new_secret, retry_delay, sign
from tests.conftest import PG_HOST, PG_USER, bearer, create_api_key

from .helpers import job_body, submit, upload, wait_for


# ---- unit: URL check, signature, schedule ---------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook",  # loopback
    "http://[::1]/hook",
    "http://10.1.2.3/hook",  # private
    "http://192.168.0.10/hook",
    "http://172.16.5.4/hook",
    "http://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
    "http://[fe80::1]/hook",
    "http://224.0.0.1/hook",  # multicast
    "http://240.0.0.1/hook",  # reserved
    "http://0.0.0.0/hook",  # unspecified
    "http://100.64.0.1/hook",  # shared (CGNAT)
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
    "http://localhost:9000/hook",  # a name that resolves to loopback
])
def test_private_addresses_are_refused_unless_allowed(url):
    with pytest.raises(UrlRefused, match="public addresses"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == []  # allowed: not even looked up


def test_public_address_passes_the_check():
    assert [str(a) for a in check_url("https://8.8.8.8:8443/hook?x=1", allow_private=False)] == ["8.8.8.8"]


@pytest.mark.parametrize("url, reason", [
    ("ftp://8.8.8.8/hook", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://8.8.8.8/", "only http and https"),
    ("8.8.8.8/hook", "only http and https"),
    ("http:///hook", "no host"),
    ("http://8.8.8.8:99999/", "out of range"),
    ("http://exa mple.com/", "spaces or control"),
])
def test_non_http_or_malformed_urls_are_refused_even_when_private_is_allowed(url, reason):
    with pytest.raises(UrlRefused, match=reason):
        check_url(url, allow_private=True)


def test_signature_verifies_with_the_standard_webhooks_library():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job-1", "note": "ünïcode"}})
    timestamp = int(time.time())
    headers = {"webhook-id": "msg-abc", "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(secret, "msg-abc", timestamp, body)}
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(Exception):  # another body, same signature
        Webhook(secret).verify(body.replace("job-1", "job-2"), headers)
    with pytest.raises(Exception):  # another secret
        Webhook(new_secret()).verify(body, headers)


def test_retry_schedule_backs_off_exponentially_for_about_a_day():
    delays = [retry_delay(n, 5.0) for n in range(1, 16)]
    assert delays[:6] == [5, 30, 120, 600, 1800, 3600]
    assert delays == sorted(delays) and delays[-1] == RETRY_MULTIPLIERS[-1] * 5.0  # capped at 4 h
    elapsed, tries = 0.0, 1
    while elapsed + retry_delay(tries, 5.0) <= 86_400:  # the default window: a day
        elapsed += retry_delay(tries, 5.0)
        tries += 1
    assert 10 <= tries <= 20  # a receiver down for a day gets a dozen or so tries, not thousands


# ---- a real receiver ---------------------------------------------------------------------------------------------

class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers 500 to the first ``fail_first`` tries
    of each message (by webhook-id), 200 after that. Other tests' jobs of the same tenant may send it
    messages too: the tests look at their own job's."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0):
        self.fail_first = fail_first
        self.requests: list[tuple[dict, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                time.sleep(delay_s)
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    tries = sum(h.get("webhook-id") == self.headers["webhook-id"] for h, _ in receiver.requests)
                    status = 500 if tries <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/distill"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, predicate, timeout: float = 90) -> list[tuple[dict, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                seen = list(self.requests)
            if predicate(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"the receiver did not get what was expected in {timeout}s; got {seen}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---- unit: one attempt, against a real receiver (no stack) ---------------------------------------------------

def attempt(url: str, secret: str, **settings) -> webhooks._Outcome:
    claim = webhooks._Claim("msg-unit", 1, 0, url, secret, json.dumps({"type": "job.failed", "data": {}}),
                            webhooks.utcnow())
    return webhooks._send(claim, Settings(**settings))


def test_the_address_is_checked_again_at_delivery():
    """An endpoint registered while allowed (or whose name now resolves inside) is not contacted."""
    receiver = Receiver()
    try:
        outcome = attempt(receiver.url, new_secret(), webhooks_allow_private=False)
        assert not outcome.ok and outcome.error.startswith("refused:") and "127.0.0.1" in outcome.error
        assert receiver.requests == []
        assert attempt(receiver.url, new_secret(), webhooks_allow_private=True).status_code == 200
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_the_connection_goes_to_the_checked_address_with_the_urls_host(monkeypatch):
    """Pinning: the name is resolved once, checked, and that address is connected to (so a DNS answer that
    changes between the check and the connection is never used); Host stays the URL's. Loopback is let
    through the check here only because a public receiver can't be had in a test."""
    receiver = Receiver()
    monkeypatch.setattr(webhooks, "_public", lambda address: True)
    secret = new_secret()
    try:
        url = receiver.url.replace("127.0.0.1", "localhost")
        outcome = attempt(url, secret, webhooks_allow_private=False)
        assert outcome.ok and outcome.status_code == 200 and outcome.response_body == "ok"
        [(headers, body)] = receiver.requests
        assert headers["host"] == f"localhost:{receiver.server.server_address[1]}"
        assert headers["webhook-id"] == "msg-unit" and Webhook(secret).verify(body, headers)["type"] == "job.failed"
    finally:
        receiver.close()


def test_a_slow_receiver_times_out():
    receiver = Receiver(delay_s=3)
    try:
        outcome = attempt(receiver.url, new_secret(), webhooks_allow_private=True, webhook_timeout_s=0.5)
        assert not outcome.ok and outcome.status_code is None and outcome.error == "timed out after 0.5 s"
    finally:
        receiver.close()


def test_a_receiver_that_is_not_there_is_a_connection_error():
    receiver = Receiver()
    url = receiver.url
    receiver.close()
    outcome = attempt(url, new_secret(), webhooks_allow_private=True)
    assert not outcome.ok and outcome.status_code is None and outcome.error.startswith("ConnectError")


@pytest.fixture
def receiver_factory(client):
    made, endpoints = [], []

    def make(fail_first: int = 0, events=("job.running", "job.succeeded")) -> tuple[Receiver, dict]:
        receiver = Receiver(fail_first)
        made.append(receiver)
        response = client.post("/webhooks", json={"url": receiver.url, "events": list(events),
                                                  "description": "test receiver"})
        assert response.status_code == 201, response.text
        endpoints.append(response.json()["id"])
        return receiver, response.json()

    yield make
    for endpoint_id in endpoints:  # no retries left behind for the tests that follow
        client.delete(f"/webhooks/{endpoint_id}")
    for receiver in made:
        receiver.close()


def run_job(client, problem) -> dict:
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = wait_for(client, submit(client, job_body(teacher["id"], training["id"], epochs=2))["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def deliveries(client, endpoint_id: str) -> list[dict]:
    response = client.get(f"/webhooks/{endpoint_id}/deliveries", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["data"]


# ---- live stack ---------------------------------------------------------------------------------------------------

def test_job_events_arrive_signed_and_are_logged(client, workers, problem, receiver_factory):
    receiver, endpoint = receiver_factory()
    assert endpoint["id"].startswith("whep-") and endpoint["object"] == "webhook_endpoint"
    assert endpoint["url"] == receiver.url and endpoint["events"] == ["job.running", "job.succeeded"]
    assert endpoint["description"] == "test receiver" and isinstance(endpoint["created_at"], int)
    secret = endpoint["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24

    job = run_job(client, problem)

    def mine(seen):
        return [(h, b) for h, b in seen if json.loads(b)["data"]["id"] == job["id"]]

    got = mine(receiver.wait(lambda seen: len(mine(seen)) >= 2))
    payloads = [Webhook(secret).verify(body, headers) for headers, body in got]  # raises on a bad signature
    # Standard Webhooks promise no order between messages (two workers may send them at once)
    running, succeeded = sorted(payloads, key=lambda p: p["type"] != "job.running")
    assert (running["type"], succeeded["type"]) == ("job.running", "job.succeeded") and len(payloads) == 2
    assert running["data"]["status"] == "running" and running["data"]["result_model_id"] is None
    assert succeeded["data"]["status"] == "succeeded" and succeeded["data"]["error"] is None
    assert succeeded["data"]["result_model_id"] == job["result_model_id"] is not None
    assert succeeded["data"]["object"] == "distillation.job" and succeeded["data"]["spec"] == job["spec"]
    assert succeeded["timestamp"].endswith("Z")
    assert len({headers["webhook-id"] for headers, _ in got}) == len(got)  # one message id per event

    # the secret is shown once: never by GET or in the list
    shown = client.get(f"/webhooks/{endpoint['id']}")
    assert shown.status_code == 200 and "secret" not in shown.json() and secret not in shown.text
    listed = client.get("/webhooks", params={"limit": 100})
    assert endpoint["id"] in [e["id"] for e in listed.json()["data"]] and secret not in listed.text

    log = {d["event_type"]: d for d in deliveries(client, endpoint["id"]) if d["job_id"] == job["id"]}
    assert set(log) == {"job.running", "job.succeeded"}
    for event_type, delivery in log.items():
        assert delivery["status"] == "succeeded" and delivery["next_attempt_at"] is None
        assert [(a["attempt"], a["status_code"], a["error"]) for a in delivery["attempts"]] == [(1, 200, None)]
        assert delivery["attempts"][0]["response_body"] == "ok"
        sent = [h for h, b in got if (json.loads(b)["type"], json.loads(b)["data"]["id"]) == (event_type, job["id"])]
        assert [delivery["id"]] == [h["webhook-id"] for h in sent]


def test_a_failing_receiver_is_retried_until_it_answers(client, workers, problem, receiver_factory):
    receiver, endpoint = receiver_factory(fail_first=2, events=["job.succeeded"])
    job = run_job(client, problem)

    def mine(seen):
        return [(h, b) for h, b in seen if json.loads(b)["data"]["id"] == job["id"]]

    got = mine(receiver.wait(lambda seen: len(mine(seen)) >= 3))
    assert len(got) == 3
    assert len({headers["webhook-id"] for headers, _ in got}) == 1  # one message, tried three times
    assert len({body for _, body in got}) == 1  # the same bytes each time
    for headers, body in got:  # each try signed afresh (its own timestamp), each valid
        assert Webhook(endpoint["secret"]).verify(body, headers)["data"]["id"] == job["id"]

    def settled():
        log = [d for d in deliveries(client, endpoint["id"]) if d["job_id"] == job["id"]]
        return log if log and log[0]["status"] != "pending" else None

    deadline = time.monotonic() + 30
    while not (log := settled()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log is not None, deliveries(client, endpoint["id"])
    [delivery] = log  # subscribed to job.succeeded only: job.running was not sent
    assert delivery["event_type"] == "job.succeeded" and delivery["job_id"] == job["id"]
    assert delivery["status"] == "succeeded" and delivery["delivered_at"] is not None
    assert delivery["id"] == got[0][0]["webhook-id"]
    attempts = delivery["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert all(a["finished_at"] is not None and a["finished_at"] >= a["started_at"] for a in attempts)
    assert attempts[0]["started_at"] <= attempts[1]["started_at"] <= attempts[2]["started_at"]
    assert len(mine(receiver.requests)) == 3  # delivered once: nothing after the 200


# ---- the API's checks -----------------------------------------------------------------------------------------------

def problem_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


@pytest.mark.parametrize("body, param", [
    ({"url": "ftp://example.com/hook", "events": ["job.succeeded"]}, "url"),
    ({"url": "file:///etc/passwd", "events": ["job.succeeded"]}, "url"),
    ({"url": "not a url", "events": ["job.succeeded"]}, "url"),
    ({"url": "http://127.0.0.1/hook", "events": ["job.succeeded", "job.exploded"]}, "events[1]"),
    ({"url": "http://127.0.0.1/hook", "events": []}, "events"),
    ({"url": "http://127.0.0.1/hook"}, "events"),
    ({"events": ["job.failed"]}, "url"),
    ({"url": "http://127.0.0.1/hook", "events": ["job.failed"], "secret": "mine"}, "secret"),
])
def test_invalid_endpoints_are_422_naming_the_field(client, body, param):
    assert problem_of(client.post("/webhooks", json=body), 422)["param"] == param


def test_get_and_delete(client):
    created = client.post("/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.failed", "job.failed"]})
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["events"] == ["job.failed"] and endpoint["description"] == ""
    assert client.get(f"/webhooks/{endpoint['id']}").json() == {k: v for k, v in endpoint.items() if k != "secret"}
    assert client.get(f"/webhooks/{endpoint['id']}/deliveries").json()["data"] == []
    deleted = client.delete(f"/webhooks/{endpoint['id']}")
    assert deleted.json() == {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}
    for response in (client.get(f"/webhooks/{endpoint['id']}"), client.delete(f"/webhooks/{endpoint['id']}"),
                     client.get(f"/webhooks/{endpoint['id']}/deliveries")):
        assert problem_of(response, 404)["param"] == "webhook_id"


def test_another_tenant_cannot_see_or_touch_an_endpoint(client, api_url, service_env):
    mine = client.post("/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.succeeded"]}).json()
    other = create_api_key(service_env, f"webhooks-other-{mine['id'][-6:]}")
    with httpx.Client(base_url=api_url + "/v1", headers=bearer(other["key"]), timeout=60) as theirs:
        assert mine["id"] not in [e["id"] for e in theirs.get("/webhooks", params={"limit": 100}).json()["data"]]
        unknown = "whep-" + "0" * 24
        for method, suffix in (("GET", ""), ("GET", "/deliveries"), ("DELETE", "")):
            got = problem_of(theirs.request(method, f"/webhooks/{mine['id']}{suffix}"), 404)
            baseline = problem_of(theirs.request(method, f"/webhooks/{unknown}{suffix}"), 404)
            assert got["detail"].replace(mine["id"], unknown) == baseline["detail"]
        assert problem_of(theirs.get("/webhooks", params={"after": mine["id"]}), 422)["param"] == "after"
    assert client.get(f"/webhooks/{mine['id']}").status_code == 200  # still there
    client.delete(f"/webhooks/{mine['id']}")


def test_a_delivery_lost_with_its_worker_is_sent_again(client, workers, service_env, receiver_factory):
    """A worker died mid-attempt: the attempt is logged but never finished, its lease ran out and its
    message is gone. The reconciler (every worker runs it) publishes the delivery again."""
    receiver, endpoint = receiver_factory(events=["job.failed"])
    message_id = f"msg-lost{uuid.uuid4().hex[:16]}"
    payload = json.dumps({"type": "job.failed", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "job-lost"}})
    database = service_env["DISTILL_DATABASE_URL"].rsplit("/", 1)[-1]
    connection = psycopg2.connect(host=PG_HOST, user=PG_USER, dbname=database)
    try:
        with connection, connection.cursor() as cursor:  # what the dead worker left behind
            cursor.execute("SELECT tenant_id FROM webhook_endpoints WHERE id = %s", (endpoint["id"],))
            [tenant] = cursor.fetchone()
            cursor.execute(
                "INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type, job_id, payload, status, "
                "attempts, next_attempt_at, published_at, lease_until, created_at) VALUES (%s, %s, %s, 'job.failed', "
                "'job-lost', %s, 'pending', 1, now() - interval '10 minutes', now() - interval '10 minutes', "
                "now() - interval '8 minutes', now() - interval '10 minutes')",
                (message_id, tenant, endpoint["id"], payload))
            cursor.execute("INSERT INTO webhook_attempts (delivery_id, attempt, started_at) "
                           "VALUES (%s, 1, now() - interval '10 minutes')", (message_id,))
    finally:
        connection.close()
    def mine(seen):
        return [(h, b) for h, b in seen if h["webhook-id"] == message_id]

    [(headers, body)] = mine(receiver.wait(lambda seen: len(mine(seen)) >= 1))
    assert headers["webhook-id"] == message_id and body == payload
    assert Webhook(endpoint["secret"]).verify(body, headers)["data"]["id"] == "job-lost"
    deadline = time.monotonic() + 30
    while (delivery := next(d for d in deliveries(client, endpoint["id"]) if d["id"] == message_id))["status"] \
            == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert delivery["id"] == message_id and delivery["status"] == "succeeded"
    assert [(a["attempt"], a["finished_at"] is None, a["status_code"]) for a in delivery["attempts"]] == \
        [(1, True, None), (2, False, 200)]  # the lost attempt stays in the log, unfinished


def test_a_cancelled_job_sends_job_cancelled(client, workers, problem, receiver_factory):
    """Cancelled while queued (the API makes the change and publishes) or while running (the worker does)."""
    receiver, endpoint = receiver_factory(events=["job.cancelled"])
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = submit(client, job_body(teacher["id"], training["id"], epochs=500))
    assert client.post(f"/distillation/jobs/{job['id']}/cancel").status_code == 200
    assert wait_for(client, job["id"])["status"] == "cancelled"
    got = receiver.wait(lambda seen: any(json.loads(b)["data"]["id"] == job["id"] for _, b in seen))
    [payload] = [p for p in (Webhook(endpoint["secret"]).verify(b, h) for h, b in got) if p["data"]["id"] == job["id"]]
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"
    assert payload["data"]["result_model_id"] is None
