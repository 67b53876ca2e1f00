"""The HTTP contract's edges: every bad input is a 4xx problem+json naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import UPLOAD_LIMIT

from .helpers import job_body, upload, upload_bytes


def problem_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body


@pytest.fixture(scope="module")
def uploaded(api_url, api_key, problem):
    import httpx

    with httpx.Client(base_url=api_url + "/v1", timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, problem.teacher, "model"),
                "training": upload(http, problem.train_csv, "dataset"),
                "validation": upload(http, problem.val_csv, "dataset")}


def test_csv_with_non_numeric_cell_names_the_line(client):
    body = problem_of(upload_bytes(client, b"a,b,label\n1,2,0\n3,oops,1\n", "d.csv", "dataset"), 422)
    assert body["line"] == 3 and "line 3" in body["detail"] and "'b'" in body["detail"]
    assert body["param"] == "file"


def test_jsonl_with_bad_line_names_it(client):
    content = b'{"features": [1, 2], "label": 0}\n{"features": [1], "label": 1}\n'
    body = problem_of(upload_bytes(client, content, "d.jsonl", "dataset"), 422)
    assert body["line"] == 2


def test_jsonl_dataset_is_accepted(client):
    content = b'{"features": [1, 2.5]}\n{"features": [0, -1]}\n'
    response = upload_bytes(client, content, "d.jsonl", "dataset")
    assert response.status_code == 201, response.text
    assert response.json()["details"] == {"format": "jsonl", "rows": 2, "num_features": 2, "has_labels": False}


def test_safetensors_without_architecture(client, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"layers.0.weight": torch.zeros(2, 3), "layers.0.bias": torch.zeros(2)}, str(path))
    body = problem_of(upload_bytes(client, path.read_bytes(), "plain.safetensors", "model"), 422)
    assert "distill_architecture" in body["detail"]


def test_safetensors_with_bad_shape_names_the_tensor(client, tmp_path):
    path = tmp_path / "bad.safetensors"
    architecture = {"kind": "mlp", "input_dim": 3, "hidden_dims": [4], "num_classes": 2, "activation": "relu"}
    tensors = {"layers.0.weight": torch.zeros(4, 5), "layers.0.bias": torch.zeros(4),
               "layers.1.weight": torch.zeros(2, 4), "layers.1.bias": torch.zeros(2)}
    save_file(tensors, str(path), metadata={"distill_architecture": json.dumps(architecture)})
    body = problem_of(upload_bytes(client, path.read_bytes(), "bad.safetensors", "model"), 422)
    assert body["tensor"] == "layers.0.weight" and "[4, 3]" in body["detail"]


def test_pickle_or_garbage_is_not_a_model(client):
    body = problem_of(upload_bytes(client, b"\x80\x04\x95garbage", "model.safetensors", "model"), 422)
    assert body["code"] == "unsafe_model" and "pickled" in body["detail"]
    body = problem_of(upload_bytes(client, b"just some bytes", "model.safetensors", "model"), 422)
    assert body["code"] == "invalid_model"


def test_unknown_purpose_and_missing_file(client):
    assert problem_of(upload_bytes(client, b"a\n1\n", "d.csv", "weights"), 422)["param"] == "purpose"
    assert problem_of(client.post("/files", data={"purpose": "dataset"}), 422)["param"] == "file"


def test_upload_over_the_limit_is_413(client):
    body = problem_of(upload_bytes(client, b"0" * (UPLOAD_LIMIT + 200_000), "big.csv", "dataset"), 413)
    assert body["code"] == "payload_too_large"


def test_unknown_ids_are_404(client):
    for path in ("/files/file-nope", "/distillation/jobs/job-nope", "/models/model-nope",
                 "/distillation/jobs/job-nope/events"):
        assert problem_of(client.get(path), 404)["code"] == "not_found"
    assert problem_of(client.post("/models/model-nope/predict", json={"inputs": [[1.0]]}), 404)
    assert problem_of(client.post("/distillation/jobs/job-nope/cancel"), 404)


@pytest.mark.parametrize("change, param", [
    (lambda b: b["hyperparameters"].update(epochs=0), "hyperparameters.epochs"),
    (lambda b: b["hyperparameters"].update(alpha=1.5), "hyperparameters.alpha"),
    (lambda b: b["hyperparameters"].update(temprature=2), "hyperparameters.temprature"),
    (lambda b: b["student"]["architecture"].update(hidden_dims=[16, 0]), "student.architecture.hidden_dims[1]"),
    (lambda b: b.update(task="regression"), "task"),
    (lambda b: b.update(teacher={"file_id": "a", "model_id": "b"}), "teacher"),
    (lambda b: b.pop("training_file"), "training_file"),
])
def test_malformed_spec_names_the_field(client, uploaded, change, param):
    body = job_body(uploaded["teacher"]["id"], uploaded["training"]["id"])
    change(body)
    problem = problem_of(client.post("/distillation/jobs", json=body), 422)
    assert problem["param"] == param, problem
    assert problem["errors"][0]["param"] == param


def test_submit_checks_the_referenced_files(client, uploaded):
    teacher, training = uploaded["teacher"]["id"], uploaded["training"]["id"]
    missing = problem_of(client.post("/distillation/jobs", json=job_body("file-missing", training)), 422)
    assert missing["param"] == "teacher.file_id"
    wrong_purpose = problem_of(client.post("/distillation/jobs", json=job_body(training, training)), 422)
    assert wrong_purpose["param"] == "teacher.file_id" and "purpose" in wrong_purpose["detail"]
    no_model = job_body(teacher, training)
    no_model["teacher"] = {"model_id": "model-missing"}
    assert problem_of(client.post("/distillation/jobs", json=no_model), 422)["param"] == "teacher.model_id"


def test_feature_count_mismatch_is_422_at_submit(client, uploaded):
    other = upload_bytes(client, b"a,b\n1,2\n3,4\n", "two.csv", "dataset").json()
    body = problem_of(client.post("/distillation/jobs", json=job_body(uploaded["teacher"]["id"], other["id"])), 422)
    assert body["code"] == "mismatch" and body["param"] == "training_file"
    assert "2 features" in body["detail"]


def test_file_listing_paginates(client):
    ids = [upload_bytes(client, f"a\n{i}\n".encode(), f"p{i}.csv", "dataset").json()["id"] for i in range(3)]
    first = client.get("/files", params={"limit": 2, "purpose": "dataset"}).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = client.get("/files", params={"limit": 2, "purpose": "dataset", "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == ids[0]
    assert problem_of(client.get("/files", params={"limit": 0}), 422)["param"] == "limit"


def test_job_listing_filters_by_status(client, uploaded):
    listing = client.get("/distillation/jobs", params={"status": "succeeded", "limit": 100}).json()
    assert all(job["status"] == "succeeded" for job in listing["data"])
    assert problem_of(client.get("/distillation/jobs", params={"status": "done"}), 422)["param"] == "status"


def test_openapi_docs_are_served(api_url):
    import httpx

    schema = httpx.get(api_url + "/openapi.json").json()
    assert "/v1/distillation/jobs" in schema["paths"] and "/v1/models/{model_id}/predict" in schema["paths"]
    assert httpx.get(api_url + "/docs").status_code == 200
