"""End to end through the real stack: HTTP → PostgreSQL → Redis → Celery worker process → files."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import safe_open

from .helpers import events, job_body, submit, upload, upload_bytes, wait_for


def forward_from_file(path, inputs: torch.Tensor) -> torch.Tensor:
    """Run a downloaded model with nothing but safetensors + torch, as a user would."""
    with safe_open(str(path), framework="pt") as reader:
        architecture = json.loads(reader.metadata()["distill_architecture"])
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    layers = len(architecture["hidden_dims"]) + 1
    x = inputs
    for k in range(layers):
        x = x @ tensors[f"layers.{k}.weight"].T + tensors[f"layers.{k}.bias"]
        if k < layers - 1:
            x = torch.relu(x)
    return torch.softmax(x, dim=-1)


def test_distill_download_and_predict(client, workers, problem, tmp_path):
    teacher = upload(client, problem.teacher, "model")
    assert teacher["details"]["architecture"]["input_dim"] == problem.features
    training = upload(client, problem.train_csv, "dataset")
    assert training["details"]["has_labels"] is False
    validation = upload(client, problem.val_csv, "dataset")

    job = submit(client, job_body(teacher["id"], training["id"], validation["id"]))
    assert job["status"] == "queued" and job["object"] == "distillation.job"
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["device"] == "cpu" and job["error"] is None
    assert job["progress"]["epoch"] == 8 and job["progress"]["step"] == job["progress"]["total_steps"] > 0
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]

    history = events(client, job["id"])
    assert [e["id"] for e in history] == sorted(e["id"] for e in history)
    stages = [e["data"]["stage"] for e in history if e["type"] == "stage"]
    assert stages == ["queued", "loading", "teacher_inference", "training", "evaluating", "exporting", "succeeded"]
    assert [e["data"]["epoch"] for e in history if e["type"] == "metrics"] == list(range(1, 9))
    assert any(e["type"] == "evaluation" for e in history)

    model = client.get(f"/models/{job['result_model_id']}").json()
    assert model["object"] == "model" and model["job_id"] == job["id"]
    assert model["architecture"]["hidden_dims"] == [16]
    evaluation = model["evaluation"]
    assert evaluation["parameter_ratio"] == model["parameters"] / teacher["details"]["parameters"]
    assert evaluation["student"]["accuracy"] > 0.8 and evaluation["agreement"] > 0.8
    assert evaluation["teacher"]["latency_ms_per_sample"] > 0 and evaluation["student"]["latency_ms_per_sample"] > 0
    assert model["id"] in [m["id"] for m in client.get("/models").json()["data"]]

    download = client.get(f"/models/{model['id']}/download")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == model["sha256"]
    assert len(download.content) == model["size_bytes"]

    downloaded = tmp_path / "student.safetensors"
    downloaded.write_bytes(download.content)
    inputs = problem.val_x[:20]
    local = forward_from_file(downloaded, inputs)
    served = client.post(f"/models/{model['id']}/predict", json={"inputs": inputs.tolist()})
    assert served.status_code == 200, served.text
    predictions = served.json()["predictions"]
    assert [p["label"] for p in predictions] == local.argmax(-1).tolist()
    assert torch.allclose(torch.tensor([p["probabilities"] for p in predictions]), local, atol=1e-5)

    short_row = client.post(f"/models/{model['id']}/predict", json={"inputs": [inputs[0].tolist(), [1.0, 2.0]]})
    assert short_row.status_code == 422 and short_row.json()["param"] == "inputs[1]"
    assert f"takes {problem.features}" in short_row.json()["detail"]

    # The student is itself a valid teacher: as an upload and by model_id.
    reuploaded = upload_bytes(client, download.content, "student.safetensors", "model")
    assert reuploaded.status_code == 201, reuploaded.text
    body = job_body(teacher["id"], training["id"], epochs=2)
    body["teacher"] = {"model_id": model["id"]}
    body["student"]["architecture"]["hidden_dims"] = [8]
    second = wait_for(client, submit(client, body)["id"])
    assert second["status"] == "succeeded", second["error"]
    assert second["metrics"]["evaluation"]["teacher"]["parameters"] == model["parameters"]


def test_cancel_running_job(client, workers, problem):
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    job = submit(client, job_body(teacher["id"], training["id"], epochs=5000, batch_size=1))
    wait_for(client, job["id"], {"running"}, condition=lambda j: j["progress"]["step"] > 0)

    in_use = client.delete(f"/files/{training['id']}")
    assert in_use.status_code == 409 and in_use.json()["param"] == "file_id"

    response = client.post(f"/distillation/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    cancelled = wait_for(client, job["id"], timeout=60)  # a bound for a hung worker, not a timing check
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"] is None and cancelled["result_model_id"] is None
    assert cancelled["progress"]["step"] < cancelled["progress"]["total_steps"]
    assert events(client, job["id"])[-1]["data"]["stage"] == "cancelled"

    again = client.post(f"/distillation/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.headers["content-type"].startswith("application/problem+json")
    assert client.delete(f"/files/{training['id']}").status_code == 200
    assert client.get(f"/files/{training['id']}").status_code == 404


def test_label_outside_teachers_classes_is_refused_at_submit(client, problem, tmp_path):
    # The upload's details record the largest label, so the submit can refuse it before a worker runs.
    bad = tmp_path / "val_bad.csv"
    lines = problem.val_csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + f",{problem.classes + 2}"
    bad.write_text("\n".join(lines) + "\n")
    teacher = upload(client, problem.teacher, "model")
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, bad, "dataset")
    response = client.post("/distillation/jobs", json=job_body(teacher["id"], training["id"], validation["id"]))
    assert response.status_code == 422, response.text
    problem_body = response.json()
    assert problem_body["code"] == "mismatch" and problem_body["param"] == "validation_file"
    assert f"label {problem.classes + 2}" in problem_body["detail"]
    assert f"{problem.classes} classes" in problem_body["detail"]
