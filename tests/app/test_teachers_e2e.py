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


def test_causal_lm_teachers(client, workers, language, tmp_path):
    """The `language` teacher and a second, briefly trained one with the same tokenizer."""
    from transformers import AutoTokenizer

    from tests.distill.hf_factories import save_model_dir, synthetic_language, tiny_gpt2

    tokenizer = AutoTokenizer.from_pretrained(language.teacher_dir)
    torch.manual_seed(1)
    corpus = synthetic_language(200, seed=21)
    weak = train_language_model(tiny_gpt2(tokenizer, n_layer=1, n_embd=48, n_head=2), tokenizer,
                                [" ".join(corpus[i:i + 4]) for i in range(0, 200, 4)], steps=40)
    weak_archive = tar_dir(save_model_dir(weak, tokenizer, tmp_path / "weak"), tmp_path / "weak.tar.gz")
    strong_file, weak_file = upload(client, language.teacher_archive, "model"), upload(client, weak_archive, "model")
    train, val = upload(client, language.train_jsonl, "dataset"), upload(client, language.val_jsonl, "dataset")
    body = {"task": "causal_lm", "teachers": [{"file_id": strong_file["id"], "weight": 0.7},
                                              {"file_id": weak_file["id"], "weight": 0.3}],
            "student": {"derive": {"num_layers": 1}}, "training_file": train["id"], "validation_file": val["id"],
            "teacher_signal": {"top_k": 16},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3}, "data": {"max_length": 64}}
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    evaluation = client.get(f"/models/{job['result_model_id']}").json()["evaluation"]
    strong, weak = evaluation["teachers"]
    assert (strong["weight"], weak["weight"]) == (0.7, 0.3)
    assert strong["perplexity"] < weak["perplexity"]  # the trained teacher is the better language model
    assert evaluation["teacher"]["parameters"] == strong["parameters"] + weak["parameters"]
    assert evaluation["student"]["perplexity"] < evaluation["student"]["perplexity_before_training"]


def test_text_classification_teachers_with_their_own_tokenizers(client, workers, tmp_path):
    from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                            tiny_bert_classifier)

    sentences = synthetic_language(240, seed=5)
    labels = [int(s.split()[1].endswith("s") or s.split()[0] in ("these", "those", "some")) for s in sentences]
    files = []
    for name, words, steps in (("a", SYNTHETIC_WORDS, 80), ("b", list(reversed(SYNTHETIC_WORDS)), 10)):
        tokenizer = make_word_tokenizer(words)
        model = train_classifier(tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2), tokenizer,
                                 sentences[:200], labels[:200], steps=steps)
        archive = tar_dir(save_model_dir(model, tokenizer, tmp_path / name), tmp_path / f"{name}.tar.gz")
        files.append(upload(client, archive, "model"))
    records = [{"text": s, "label": y} for s, y in zip(sentences, labels)]
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", records[:200]), "dataset")
    val = upload(client, write_jsonl(tmp_path / "val.jsonl", records[200:]), "dataset")
    body = {"task": "text_classification", "teachers": [{"file_id": f["id"]} for f in files],
            "student": {"derive": {"num_layers": 1}}, "training_file": train["id"], "validation_file": val["id"],
            "hyperparameters": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3}, "data": {"max_length": 32}}
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    evaluation = client.get(f"/models/{job['result_model_id']}").json()["evaluation"]
    assert [t["weight"] for t in evaluation["teachers"]] == [0.5, 0.5]
    assert all(0 <= t["accuracy"] <= 1 and 0 <= t["student_agreement"] <= 1 for t in evaluation["teachers"])

    # teachers with different label sets can't be mixed
    three = tiny_bert_classifier(make_word_tokenizer(SYNTHETIC_WORDS), num_labels=3, num_hidden_layers=1)
    three_file = upload(client, tar_dir(save_model_dir(three, make_word_tokenizer(SYNTHETIC_WORDS), tmp_path / "c"),
                                        tmp_path / "c.tar.gz"), "model")
    response = client.post("/distillation/jobs", json={**body, "teachers": [{"file_id": files[0]["id"]},
                                                                              {"file_id": three_file["id"]}]})
    assert response.status_code == 422 and response.json()["param"] == "teachers[1]", response.text
