"""The client on its own: no torch, only httpx and pydantic, retries, typed errors and a
resumed event stream, each against a tiny local HTTP server that answers as scripted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distill_client import (APIConnectionError, Distill, InternalServerError, NotFoundError, RateLimitError,
                            UnprocessableError)

from .conftest import CLIENT_DIR, client_env

JOB = {"id": "job-abc", "object": "distillation.job", "status": "queued", "created_at": 1, "started_at": None,
       "finished_at": None, "spec": {}, "progress": {"epoch": 0, "step": 0, "total_steps": 0}, "metrics": {},
       "error": None, "result_model_id": None, "a_field_from_a_newer_server": {"x": 1}}


@contextmanager
def scripted_server(answers):
    """Serves ``answers`` in order: each (status, headers, body); records every request's path and headers."""
    seen: list[dict] = []
    remaining = list(answers)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("content-length") or 0)
            seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                         "body": self.rfile.read(length) if length else b""})
            status, headers, body = remaining.pop(0) if remaining else (500, {}, b"script exhausted")
            if callable(body):
                return body(self)
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def problem(status, detail, code, param=None):
    return {"type": "about:blank", "title": "x", "status": status, "detail": detail, "code": code, "param": param}


def test_retries_503_twice_then_succeeds():
    answers = [(503, {}, problem(503, "broker down", "unavailable"))] * 2 + [(200, {}, JOB)]
    with scripted_server(answers) as (url, seen), Distill(api_key="k", base_url=url) as client:
        job = client.jobs.retrieve("job-abc")
    assert len(seen) == 3  # two 503s, then the answer
    assert all(r["path"] == "/v1/distillation/jobs/job-abc" for r in seen)
    assert seen[0]["headers"]["Authorization"] == "Bearer k"
    assert job.id == "job-abc" and job.status == "queued"
    assert job.a_field_from_a_newer_server == {"x": 1}  # lenient: a newer server's field is kept


def test_retry_after_is_honoured_and_the_same_idempotency_key_is_resent():
    answers = [(429, {"Retry-After": "0"}, problem(429, "slow down", "too_many_requests"))] + [(201, {}, JOB)]
    with scripted_server(answers) as (url, seen), Distill(api_key="k", base_url=url) as client:
        job = client.jobs.create({"task": "classification"}, training_file="file-1")
    assert job.id == "job-abc" and len(seen) == 2
    keys = {r["headers"]["Idempotency-Key"] for r in seen}
    assert len(keys) == 1 and keys.pop().startswith("distill-client-")  # a retried create runs once
    assert json.loads(seen[1]["body"]) == {"task": "classification", "training_file": "file-1"}


def test_gives_up_after_max_retries_with_the_servers_message():
    answers = [(503, {"Retry-After": "0"}, problem(503, "the broker is unreachable", "unavailable"))] * 5
    with scripted_server(answers) as (url, seen), Distill(api_key="k", base_url=url, max_retries=1) as client:
        with pytest.raises(InternalServerError) as caught:
            client.models.list()
    assert len(seen) == 2  # the call and one retry
    assert caught.value.status == 503 and caught.value.code == "unavailable"
    assert "the broker is unreachable" in str(caught.value)


@pytest.mark.parametrize("status, error", [(404, NotFoundError), (422, UnprocessableError)])
def test_other_4xx_are_not_retried_and_are_typed(status, error):
    body = problem(status, "hyperparameters.epochs: must be >= 1", "invalid_request", "hyperparameters.epochs")
    with scripted_server([(status, {"Content-Type": "application/problem+json"}, body)] * 3) as (url, seen), \
            Distill(api_key="k", base_url=url) as client:
        with pytest.raises(error) as caught:
            client.jobs.create(task="classification")
    assert len(seen) == 1
    assert caught.value.param == "hyperparameters.epochs" and caught.value.status == status
    assert caught.value.detail == "hyperparameters.epochs: must be >= 1"
    assert "hyperparameters.epochs: must be >= 1" in str(caught.value)


def test_a_rate_limit_past_the_retries_is_a_rate_limit_error():
    with scripted_server([(429, {"Retry-After": "0"}, problem(429, "too many running jobs", "quota"))] * 3) \
            as (url, seen), Distill(api_key="k", base_url=url, max_retries=2) as client:
        with pytest.raises(RateLimitError, match="too many running jobs"):
            client.files.list()
    assert len(seen) == 3


def test_connection_errors_are_retried_then_raised():
    import socket
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Distill(api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=1) as client:
        with pytest.raises(APIConnectionError, match="cannot reach"):
            client.jobs.retrieve("job-abc")


def test_environment_configures_the_client(monkeypatch):
    monkeypatch.setenv("DISTILL_API_KEY", "from-env")
    monkeypatch.setenv("DISTILL_BASE_URL", "http://example.invalid:9/")
    client = Distill()
    assert client.api_key == "from-env" and client.base_url == "http://example.invalid:9/v1"
    monkeypatch.delenv("DISTILL_BASE_URL")
    assert Distill().base_url == "http://localhost:8000/v1"
    assert Distill(base_url="http://h:1/v1").base_url == "http://h:1/v1"  # no second /v1


def _event(i, type_="metrics", data=None):
    body = {"id": i, "object": "distillation.job.event", "created_at": 1, "type": type_, "message": f"e{i}",
            "data": data or {"epoch": i}}
    return f"id: {i}\nevent: {type_}\ndata: {json.dumps(body)}\n\n".encode()


def test_event_stream_resumes_with_last_event_id_after_a_dropped_connection():
    def dropped(handler):  # two events, then the connection dies mid-body (no end of the chunked stream)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for chunk in (b"retry: 10\n\n", b": keep-alive\n\n", _event(1), _event(2)):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(2)

    def rest(handler):
        payload = _event(3) + _event(4, "stage", {"stage": "succeeded"}) + _event(5)  # 5: after the end, unread
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    answers = [(200, {}, JOB), (200, {}, dropped), (200, {}, rest)]
    with scripted_server(answers) as (url, seen), Distill(api_key="k", base_url=url) as client:
        stream = client.jobs.events("job-abc", stream=True)
        events = list(stream)
    assert [e.id for e in events] == [1, 2, 3, 4]  # nothing lost, nothing repeated, ends at the final stage
    assert events[-1].is_final and stream.reconnects == 1
    streams = [r for r in seen if "stream=true" in r["path"]]
    assert "Last-Event-ID" not in streams[0]["headers"] and streams[1]["headers"]["Last-Event-ID"] == "2"


def test_the_package_imports_without_torch(tmp_path):
    probe = ("import sys, distill_client, distill_client.cli; "
             "c = distill_client.Distill(api_key='x'); "
             "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=client_env(dict(os.environ)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_it_declares_only_httpx_and_pydantic_and_builds_on_its_own(tmp_path):
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"httpx", "pydantic"}
    # The wheel, built from client/ alone (no network), holds the package and requires just those two.
    source = shutil.copytree(CLIENT_DIR, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("distill_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        listed = archive.namelist()
        metadata = archive.read(next(n for n in listed if n.endswith("METADATA"))).decode()
    assert "distill_client/cli.py" in listed and not any(n.startswith(("distill/", "app/")) for n in listed)
    requires = {line.split(":", 1)[1].strip().split(">")[0] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    assert requires == {"httpx", "pydantic"}
