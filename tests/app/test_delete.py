"""DELETE /v1/distillation/jobs/{id} and DELETE /v1/models/{id} over the real stack: 409 while
a job is queued or running (or, for a model, while such a job loads it), and on success the
rows go and so do the bytes they own."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import job_body, submit, upload, wait_for

LONG = 200  # epochs: with a checkpoint every step (the test env) the job stays active for the checks


@pytest.fixture
def artifacts(service_env) -> Path:
    return Path(service_env["DISTILL_ARTIFACTS_DIR"])


@pytest.fixture
def files(client, problem) -> dict:
    return {"teacher": upload(client, problem.teacher, "model")["id"],
            "training": upload(client, problem.train_csv, "dataset")["id"]}


def conflict(response, param: str) -> dict:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["code"] == "conflict" and body["param"] == param
    return body


def cancelled(client, job_id: str) -> dict:
    assert client.post(f"/distillation/jobs/{job_id}/cancel").status_code in (200, 409)
    return wait_for(client, job_id, timeout=240)


def test_a_job_is_deleted_only_once_finished(client, workers, files, artifacts):
    job = submit(client, job_body(files["teacher"], files["training"], epochs=LONG))
    assert "cancel it" in conflict(client.delete(f"/distillation/jobs/{job['id']}"), "job_id")["detail"]
    assert client.get(f"/distillation/jobs/{job['id']}").status_code == 200
    assert cancelled(client, job["id"])["status"] == "cancelled"
    leftover = artifacts / "jobs" / job["id"] / "checkpoints" / "step-000001"  # what a lost worker leaves
    leftover.mkdir(parents=True, exist_ok=True)
    (leftover / "state.json").write_text("{}")

    response = client.delete(f"/distillation/jobs/{job['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": job["id"], "object": "distillation.job", "deleted": True}
    assert not (artifacts / "jobs" / job["id"]).exists()
    for path in (f"/distillation/jobs/{job['id']}", f"/distillation/jobs/{job['id']}/events"):
        assert client.get(path).status_code == 404
    assert client.delete(f"/distillation/jobs/{job['id']}").status_code == 404
    listed = client.get("/distillation/jobs", params={"limit": 100}).json()["data"]
    assert job["id"] not in [j["id"] for j in listed]


def test_deleting_a_job_keeps_its_model(client, workers, files):
    job = wait_for(client, submit(client, job_body(files["teacher"], files["training"], epochs=2))["id"])
    assert job["status"] == "succeeded", job["error"]
    assert client.delete(f"/distillation/jobs/{job['id']}").status_code == 200
    model = client.get(f"/models/{job['result_model_id']}")
    assert model.status_code == 200 and model.json()["job_id"] is None
    assert client.get(f"/models/{job['result_model_id']}/download").status_code == 200


def test_a_model_in_use_is_not_deleted_then_is_with_its_storage(client, workers, files, artifacts):
    job = wait_for(client, submit(client, job_body(files["teacher"], files["training"], epochs=2))["id"])
    assert job["status"] == "succeeded", job["error"]
    model_id = job["result_model_id"]
    folder = artifacts / "models" / model_id
    assert folder.is_dir() and any(folder.iterdir())

    body = job_body(files["teacher"], files["training"], epochs=LONG)
    body["teacher"] = {"model_id": model_id}  # the finished student now teaches a running job
    active = submit(client, body)
    refused = conflict(client.delete(f"/models/{model_id}"), "model_id")
    assert active["id"] in refused["detail"] and "teacher" in refused["detail"]
    assert folder.is_dir() and client.get(f"/models/{model_id}").status_code == 200
    assert cancelled(client, active["id"])["status"] == "cancelled"

    response = client.delete(f"/models/{model_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": model_id, "object": "model", "deleted": True}
    assert not folder.exists()
    for path in (f"/models/{model_id}", f"/models/{model_id}/download"):
        assert client.get(path).status_code == 404
    assert client.delete(f"/models/{model_id}").status_code == 404
    assert client.get(f"/distillation/jobs/{job['id']}").json()["result_model_id"] == model_id  # history stays
