"""Nothing lost: jobs survive SIGKILLed, paused and SIGTERMed workers and a flushed broker.

Each test runs on a stack of its own (tests/app/stack.py) with the liveness timeouts cut
to seconds, and decides which worker processes exist when. What holds:

- kill -9 mid-training (three kills across an MLP and a causal-LM job): the reconciler
  re-queues the job once its heartbeat is stale, a new worker resumes it from a step
  checkpoint (an event ``resumed`` with step > 0), and it succeeds within two minutes of
  the kill;
- a worker paused past the heartbeat timeout comes back to find its lease gone: it writes
  nothing, the job runs once to success elsewhere, one model is made;
- SIGTERM (a deploy): the worker checkpoints, hands the job back and exits within its
  grace period; the next worker finishes the job;
- the broker's queue is flushed with jobs queued: the reconciler re-sends them; all finish.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.conftest import REDIS_URL, _stop

from .helpers import events, job_body, submit, upload, wait_for
from .stack import Stack

KILL_TO_SUCCESS_S = 120


@pytest.fixture
def stack(service_env, tmp_path):
    with Stack(service_env, tmp_path) as own:
        yield own


@pytest.fixture
def mlp_files(stack, problem):
    client = stack.client
    return (upload(client, problem.teacher, "model")["id"], upload(client, problem.train_csv, "dataset")["id"],
            upload(client, problem.val_csv, "dataset")["id"])


def _stages(job_events: list[dict], stage: str) -> list[dict]:
    return [e["data"] for e in job_events if e["type"] == "stage" and e["data"]["stage"] == stage]


def _restart_reasons(job_events: list[dict]) -> list[str]:
    return [e["data"]["reason"] for e in job_events if e["type"] == "restarted"]


def _training_with_checkpoint(stack, job_id: str, min_step: int, after_step: int = 0) -> int:
    job = wait_for(stack.client, job_id, statuses={"running"}, timeout=180,
                   condition=lambda j: j["progress"]["step"] >= max(min_step, after_step + 3)
                   and stack.checkpoints(job_id))
    return job["progress"]["step"]


def _kill(process) -> float:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    return time.monotonic()


def test_killed_mlp_job_resumes_from_a_step_checkpoint(stack, mlp_files):
    client = stack.client
    first = stack.start_worker()
    job = submit(client, job_body(*mlp_files, epochs=40, batch_size=8))
    killed_at_step = _training_with_checkpoint(stack, job["id"], min_step=100)
    killed = _kill(first)
    assert client.get(f"/distillation/jobs/{job['id']}").json()["status"] == "running"  # nobody finished it

    stack.start_worker()
    job = wait_for(client, job["id"], timeout=KILL_TO_SUCCESS_S)
    assert time.monotonic() - killed < KILL_TO_SUCCESS_S
    job_events = events(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    resumed = _stages(job_events, "resumed")
    assert len(resumed) == 1 and 0 < resumed[0]["step"] <= killed_at_step + 50  # about one checkpoint back
    assert _restart_reasons(job_events) == ["worker_lost"]
    assert job["metrics"]["epoch"] == 40
    assert sorted({e["data"]["epoch"] for e in job_events if e["type"] == "metrics"}) == list(range(1, 41))


def test_causal_lm_job_killed_twice_resumes_each_time(stack, language):
    client = stack.client
    teacher = upload(client, language.teacher_archive, "model")
    train = upload(client, language.train_jsonl, "dataset")
    val = upload(client, language.val_jsonl, "dataset")
    body = {"task": "causal_lm", "teacher": {"file_id": teacher["id"]}, "student": {"derive": {"num_layers": 2}},
            "training_file": train["id"], "validation_file": val["id"],
            "hyperparameters": {"epochs": 12, "batch_size": 4, "learning_rate": 3e-3}, "data": {"max_length": 32}}
    worker = stack.start_worker()
    job = submit(client, body)
    step = 0
    for _ in range(2):
        step = _training_with_checkpoint(stack, job["id"], min_step=8, after_step=step)
        killed = _kill(worker)
        worker = stack.start_worker()
        wait_for(client, job["id"], statuses={"running", "succeeded"}, timeout=60,
                 condition=lambda j: j["status"] == "succeeded" or len(_stages(events(client, j["id"]), "resumed")) >= 1)
    job = wait_for(client, job["id"], timeout=KILL_TO_SUCCESS_S)
    assert time.monotonic() - killed < KILL_TO_SUCCESS_S
    job_events = events(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    resumed = _stages(job_events, "resumed")
    assert len(resumed) == 2 and all(r["step"] > 0 for r in resumed) and resumed[1]["step"] >= resumed[0]["step"]
    assert _restart_reasons(job_events) == ["worker_lost", "worker_lost"]
    evaluation = job["metrics"]["evaluation"]
    assert evaluation["student"]["perplexity"] < evaluation["student"]["perplexity_before_training"]


def test_a_paused_worker_that_comes_back_writes_nothing(stack, mlp_files):
    client = stack.client
    slow = stack.start_worker()
    job = submit(client, job_body(*mlp_files, epochs=30, batch_size=8))
    _training_with_checkpoint(stack, job["id"], min_step=50)
    os.kill(slow.pid, signal.SIGSTOP)  # alive, but silent past the heartbeat timeout
    stack.start_worker()
    wait_for(client, job["id"], statuses={"running", "succeeded"}, timeout=60,
             condition=lambda j: "worker_lost" in _restart_reasons(events(client, j["id"])))
    os.kill(slow.pid, signal.SIGCONT)  # back, still "running" the job it no longer holds
    job = wait_for(client, job["id"], timeout=KILL_TO_SUCCESS_S)
    assert job["status"] == "succeeded", job["error"]
    time.sleep(3)  # give the old worker time to try its writes
    job_events = events(client, job["id"])
    assert [e["data"]["stage"] for e in job_events if e["type"] == "stage"].count("succeeded") == 1
    assert _stages(job_events, "succeeded") == [job_events[-1]["data"]]  # nothing was written after it
    models = [m for m in client.get("/models", params={"limit": 100}).json()["data"] if m["job_id"] == job["id"]]
    assert [m["id"] for m in models] == [job["result_model_id"]]  # one run finished, one model
    assert slow.poll() is None  # the old worker lives on, idle, without crashing


def test_sigterm_hands_the_job_back_and_the_next_worker_finishes_it(stack, mlp_files):
    client = stack.client
    first = stack.start_worker()
    job = submit(client, job_body(*mlp_files, epochs=40, batch_size=8))
    _training_with_checkpoint(stack, job["id"], min_step=100)
    sent = time.monotonic()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    assert time.monotonic() - sent < float(stack.env["DISTILL_SHUTDOWN_GRACE_S"])
    handed_back = client.get(f"/distillation/jobs/{job['id']}").json()
    assert handed_back["status"] == "queued"

    stack.start_worker()
    job = wait_for(client, job["id"], timeout=KILL_TO_SUCCESS_S)
    job_events = events(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert _restart_reasons(job_events) == ["worker shutting down"]
    resumed = _stages(job_events, "resumed")
    assert len(resumed) == 1 and resumed[0]["step"] > 0


def test_jobs_queued_when_the_broker_loses_its_messages_all_finish(stack, mlp_files):
    client = stack.client
    ids = [submit(client, job_body(*mlp_files, epochs=2))["id"] for _ in range(5)]  # no worker yet
    broker = redis.Redis.from_url(REDIS_URL)
    flushed = [key for key in broker.scan_iter(match=stack.env["DISTILL_QUEUE"] + "*")
               if broker.type(key) == b"list"]
    assert flushed and broker.delete(*flushed) >= 1
    worker = stack.start_worker()
    try:
        finished = [wait_for(client, job_id, timeout=120) for job_id in ids]
    finally:
        _stop(worker)
    assert [job["status"] for job in finished] == ["succeeded"] * 5
