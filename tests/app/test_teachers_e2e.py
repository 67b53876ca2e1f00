"""Several teachers through the real stack: the job trains on the weighted mixture of the teachers'
probabilities, the evaluation lists every teacher beside the student, and combinations that can't
run are refused at submit with the field."""

from __future__ import annotations

import torch

from distill.models import MLP, MLPArchitecture, save_model
from tests.factories import tar_dir, train_classifier, train_language_model, write_jsonl

from .helpers import job_body, submit, upload, wait_for


def _noisy_teacher(problem, path):
    torch.manual_seed(11)
    teacher = MLP(MLPArchitecture(input_dim=problem.features, hidden_dims=[16], num_classes=problem.classes))
    return save_model(teacher, path)


def test_mlp_teachers_mixture(client, workers, problem, tmp_path):
    strong = upload(client, problem.teacher, "model")
    weak = upload(client, _noisy_teacher(problem, tmp_path / "weak.safetensors"), "model")
    training = upload(client, problem.train_csv, "dataset")
    validation = upload(client, problem.val_csv, "dataset")
    body = job_body(strong["id"], training["id"], validation["id"], epochs=4)
    del body["teacher"]
    body["teachers"] = [{"file_id": strong["id"], "weight": 0.8}, {"file_id": weak["id"], "weight": 0.2}]
    job = wait_for(client, submit(client, body)["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["teachers"][0]["weight"] == 0.8 and job["spec"]["teacher"] is None
    model = client.get(f"/models/{job['result_model_id']}").json()
    teachers = model["evaluation"]["teachers"]
    assert [t["weight"] for t in teachers] == [0.8, 0.2]
    assert [t["name"] for t in teachers] == [f"{strong['id']} (teacher.safetensors)", f"{weak['id']} (weak.safetensors)"]
    assert teachers[0]["accuracy"] > teachers[1]["accuracy"]
    assert teachers[0]["student_agreement"] > teachers[1]["student_agreement"]
    assert model["evaluation"]["teacher"]["parameters"] == sum(t["parameters"] for t in teachers)

    # a teacher in use by a queued/running job can't be deleted; this one finished, so it can
    assert client.delete(f"/files/{weak['id']}").status_code == 200


def test_teachers_with_different_label_sets_are_refused(client, problem, tmp_path):
    torch.manual_seed(0)
    other = save_model(MLP(MLPArchitecture(input_dim=problem.features, hidden_dims=[8],
                                           num_classes=problem.classes + 2)), tmp_path / "five.safetensors")
    first, second = upload(client, problem.teacher, "model"), upload(client, other, "model")
    training = upload(client, problem.train_csv, "dataset")
    body = job_body(first["id"], training["id"])
    del body["teacher"]
    body["teachers"] = [{"file_id": first["id"]}, {"file_id": second["id"]}]
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["param"] == "teachers[1]" and "label set" in response.json()["detail"]

    both = {**body, "teacher": {"file_id": first["id"]}}
    response = client.post("/distillation/jobs", json=both)
    assert response.status_code == 422 and response.json()["param"] == "teacher"

    one = {**body, "teachers": [{"file_id": first["id"]}]}
    response = client.post("/distillation/jobs", json=one)
    assert response.status_code == 422 and response.json()["param"].startswith("teachers")

    zero_weight = {**body, "teachers": [{"file_id": first["id"], "weight": 0}, {"file_id": first["id"]}]}
    response = client.post("/distillation/jobs", json=zero_weight)
    assert response.status_code == 422 and response.json()["param"] == "teachers[0].weight"
