"""A worker killed with SIGKILL mid-training loses nothing: the job's message comes back
to a new worker process, which resumes from the newest step checkpoint and finishes.

Its own small stack (one API, one worker at a time, a queue of its own) so the test
decides which worker holds the job. Redelivery is the broker's: the Redis visibility
timeout is shortened here to a few seconds (in production it is longer than any job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, _free_port, _start, _stop, _wait_for

from .helpers import events, job_body, submit, upload, wait_for

VISIBILITY_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def stack(service_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("death-logs")
    env = {**service_env, "DISTILL_QUEUE": f"distill-death-{uuid.uuid4().hex[:8]}",
           "DISTILL_BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
           "DISTILL_CHECKPOINT_INTERVAL_S": "0.3"}
    port = _free_port()
    api = _start([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
                 env, logs / "api.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(healthy, 60, "the API")
    started: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        log = logs / f"worker{len(started)}.log"
        process = _start([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
                          "-n", f"death{len(started)}-{uuid.uuid4().hex[:6]}@%h", "-Q", env["DISTILL_QUEUE"]],
                         env, log)
        started.append(process)
        _wait_for(lambda: log.exists() and b"ready." in log.read_bytes(), 90, "a worker")
        return process

    with httpx.Client(base_url=url + "/v1", timeout=120) as client:
        yield {"client": client, "start_worker": start_worker, "env": env}
    for process in started:
        if process.poll() is None:
            _stop(process)
    _stop(api)


def _checkpoints(env: dict, job_id: str) -> list[Path]:
    return sorted((Path(env["DISTILL_ARTIFACTS_DIR"]) / "jobs" / job_id / "checkpoints").glob("step-*"))


def _kill_during_training_then_resume(stack, body: dict, min_step: int) -> tuple[dict, list[dict], int]:
    client, env = stack["client"], stack["env"]
    first = stack["start_worker"]()
    job = submit(client, body)
    # Training, past a few steps, with a checkpoint on disk: then the worker dies at once.
    wait_for(client, job["id"], statuses={"running"}, timeout=180,
             condition=lambda j: j["progress"]["step"] >= min_step and _checkpoints(env, job["id"]))
    killed_at = client.get(f"/distillation/jobs/{job['id']}").json()["progress"]["step"]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert client.get(f"/distillation/jobs/{job['id']}").json()["status"] == "running"  # nobody finished it

    second = stack["start_worker"]()
    try:
        job = wait_for(client, job["id"], timeout=240)
    finally:
        _stop(second)
    return job, events(client, job["id"]), killed_at


def test_killed_mlp_job_resumes_from_a_step_checkpoint(stack, problem):
    client = stack["client"]
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, problem.val_csv, "dataset")
    body = job_body(teacher["id"], training["id"], validation["id"], epochs=40, batch_size=8)
    job, job_events, killed_at = _kill_during_training_then_resume(stack, body, min_step=100)

    assert job["status"] == "succeeded", job["error"]
    resumed = [e["data"] for e in job_events if e["type"] == "stage" and e["data"]["stage"] == "resumed"]
    assert len(resumed) == 1 and 0 < resumed[0]["step"] <= killed_at + 50  # at most one checkpoint interval back
    assert job["metrics"]["epoch"] == 40
    epochs = [e["data"]["epoch"] for e in job_events if e["type"] == "metrics"]
    assert sorted(set(epochs)) == list(range(1, 41))  # every epoch recorded; none lost with the worker


def test_killed_causal_lm_job_resumes_from_a_step_checkpoint(stack, language):
    client = stack["client"]
    teacher = upload(client, language.teacher_archive, "model")
    train = upload(client, language.train_jsonl, "dataset")
    val = upload(client, language.val_jsonl, "dataset")
    body = {"task": "causal_lm", "teacher": {"file_id": teacher["id"]}, "student": {"derive": {"num_layers": 2}},
            "training_file": train["id"], "validation_file": val["id"],
            "hyperparameters": {"epochs": 12, "batch_size": 4, "learning_rate": 3e-3}, "data": {"max_length": 32}}
    job, job_events, killed_at = _kill_during_training_then_resume(stack, body, min_step=8)

    assert job["status"] == "succeeded", job["error"]
    resumed = [e["data"] for e in job_events if e["type"] == "stage" and e["data"]["stage"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] > 0
    assert job["metrics"]["epoch"] == 12
    assert job["metrics"]["evaluation"]["student"]["perplexity"] < \
        job["metrics"]["evaluation"]["student"]["perplexity_before_training"]
    assert client.get(f"/models/{job['result_model_id']}").status_code == 200
