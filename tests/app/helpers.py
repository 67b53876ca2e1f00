from __future__ import annotations

import time
from pathlib import Path

import httpx

FINISHED = {"succeeded", "failed", "cancelled"}


def upload(client: httpx.Client, path: Path, purpose: str, filename: str | None = None) -> dict:
    with open(path, "rb") as handle:
        response = client.post("/files", files={"file": (filename or path.name, handle)}, data={"purpose": purpose})
    assert response.status_code == 201, response.text
    return response.json()


def upload_bytes(client: httpx.Client, content: bytes, filename: str, purpose: str) -> httpx.Response:
    return client.post("/files", files={"file": (filename, content)}, data={"purpose": purpose})


def job_body(teacher_id: str, training_id: str, validation_id: str | None = None, **hyperparameters) -> dict:
    body = {
        "task": "classification",
        "teacher": {"file_id": teacher_id},
        "student": {"architecture": {"kind": "mlp", "hidden_dims": [16]}},
        "training_file": training_id,
        "hyperparameters": {"epochs": 8, "batch_size": 32, "learning_rate": 0.01, "temperature": 2.0, **hyperparameters},
        "metadata": {"purpose": "test"},
    }
    if validation_id:
        body["validation_file"] = validation_id
    return body


def submit(client: httpx.Client, body: dict) -> dict:
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: str, statuses=FINISHED, timeout: float = 180, condition=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/distillation/jobs/{job_id}").json()
        if job["status"] in statuses and (condition is None or condition(job)):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s; last: {job}")


def events(client: httpx.Client, job_id: str) -> list[dict]:
    collected, after = [], None
    while True:
        params = {"limit": 1000, **({"after": after} if after is not None else {})}
        page = client.get(f"/distillation/jobs/{job_id}/events", params=params).json()
        collected += page["data"]
        if not page["has_more"]:
            return collected
        after = page["data"][-1]["id"]
