"""A stack of its own for tests (and benchmarks/chaos.py) that kill, pause and stop workers:
one API process and the worker processes the test starts, on a queue of their own, sharing
the session's database and artifacts folder, with the liveness timeouts cut to seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from tests.conftest import _free_port, _start, _stop, _wait_for, bearer

FAST_LIVENESS = {"DISTILL_HEARTBEAT_TIMEOUT_S": "3", "DISTILL_RECONCILE_INTERVAL_S": "1",
                 "DISTILL_QUEUED_RESEND_AFTER_S": "3", "DISTILL_SHUTDOWN_GRACE_S": "10",
                 "DISTILL_CHECKPOINT_INTERVAL_S": "0.3"}


class Stack:
    def __init__(self, base_env: dict, logs: Path, **overrides: str):
        self.env = {**base_env, "DISTILL_QUEUE": f"distill-own-{uuid.uuid4().hex[:8]}", **FAST_LIVENESS, **overrides}
        self.logs = logs
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.url = ""
        self.client: httpx.Client | None = None

    def __enter__(self) -> "Stack":
        port = _free_port()
        self.api = _start([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                           "--port", str(port)], self.env, self.logs / "api.log")
        self.url = url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, 60, "the API")
        self.client = httpx.Client(base_url=url + "/v1", timeout=120, headers=bearer(self.env["_API_KEY"]))
        return self

    def __exit__(self, *exc) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a paused worker can't handle SIGTERM
                _stop(process)
        self.client.close()
        _stop(self.api)

    def start_worker(self) -> subprocess.Popen:
        log = self.logs / f"worker{len(self.workers)}.log"
        process = _start([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
                          "-n", f"own{len(self.workers)}-{uuid.uuid4().hex[:6]}@%h", "-Q", self.env["DISTILL_QUEUE"]],
                         self.env, log)
        self.workers.append(process)
        _wait_for(lambda: log.exists() and b"ready." in log.read_bytes(), 90, "a worker")
        return process

    def checkpoints(self, job_id: str) -> list[Path]:
        return sorted((Path(self.env["DISTILL_ARTIFACTS_DIR"]) / "jobs" / job_id / "checkpoints").glob("step-*"))
