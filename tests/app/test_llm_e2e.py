"""Language-model distillation end to end through the real stack: a tiny GPT-2 teacher
trained on a synthetic language, uploaded as an archive, distilled by a worker process,
downloaded and loaded with ``from_pretrained``, and served by ``/v1/completions``."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.factories import tar_dir, train_classifier, write_jsonl

from .helpers import events, submit, upload, upload_bytes, wait_for


@pytest.fixture(scope="module")
def uploaded(api_url, api_key, language):
    import httpx

    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, language.teacher_archive, "model"),
                "train": upload(http, language.train_jsonl, "dataset"),
                "val": upload(http, language.val_jsonl, "dataset"),
                "prompts": upload(http, language.prompts_jsonl, "dataset")}


def lm_body(uploaded: dict, student: dict, **extra) -> dict:
    return {"task": "causal_lm", "teacher": {"file_id": uploaded["teacher"]["id"]}, "student": student,
            "training_file": uploaded["train"]["id"], "validation_file": uploaded["val"]["id"],
            "hyperparameters": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3},
            "data": {"max_length": 64}, **extra}


def download_model_dir(client, model_id: str, folder):
    response = client.get(f"/models/{model_id}/download")
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")
    (model_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    return model_dir


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids + [tokenizer.eos_token_id]])
        loss = model(input_ids=ids, labels=ids).loss
        nll += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_teacher_archive_is_described_on_upload(uploaded):
    details = uploaded["teacher"]["details"]
    assert details["format"] == "hf" and details["task"] == "causal_lm" and details["model_type"] == "gpt2"
    assert details["num_layers"] == 4 and details["has_tokenizer"] is True
    assert uploaded["train"]["details"]["kind"] == "text"
    assert uploaded["prompts"]["details"]["kind"] == "prompt_completion"


@pytest.mark.parametrize("student, loss, expected_layers", [
    ({"derive": {"num_layers": 2}}, {"type": "forward_kl"}, 2),
    ({"architecture": {"kind": "hf", "config": {"n_layer": 2, "n_embd": 32, "n_head": 2}}},
     {"type": "jsd", "beta": 0.5}, 2),
])
def test_token_level_kd(client, workers, uploaded, language, tmp_path, student, loss, expected_layers):
    job = submit(client, lm_body(uploaded, student, loss=loss))
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    stages = [e["data"]["stage"] for e in events(client, job["id"]) if e["type"] == "stage"]
    assert stages[-3:] == ["evaluating", "exporting", "succeeded"]

    model = client.get(f"/models/{job['result_model_id']}").json()
    evaluation = model["evaluation"]
    assert model["task"] == "causal_lm" and model["architecture"]["num_layers"] == expected_layers
    assert evaluation["student"]["perplexity"] < evaluation["student"]["perplexity_before_training"]
    assert 0 <= evaluation["top1_agreement"] <= 1 and evaluation["kl_teacher_student"] >= 0
    assert evaluation["teacher"]["generation_tokens_per_s"] > 0 and evaluation["parameter_ratio"] < 1

    model_dir = download_model_dir(client, model["id"], tmp_path)
    student_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    card = (model_dir / "README.md").read_text()
    assert loss["type"] in card and "perplexity" in card.lower()
    # The same student before training: derived from the teacher, or fresh from the config.
    from distill.hf import derive_student, load_causal_lm, student_from_config

    teacher = load_causal_lm(language.teacher_dir)
    if "derive" in student:
        untrained = derive_student(teacher, num_layers=2)
    else:
        torch.manual_seed(0)
        untrained = student_from_config(teacher.config, student["architecture"]["config"], "causal_lm")
    assert perplexity(student_model, tokenizer, language.held_out) < perplexity(untrained.eval(), tokenizer,
                                                                                  language.held_out)

    completion = client.post("/completions", json={"model": model["id"], "prompt": "the cat", "max_tokens": 6,
                                                    "temperature": 0})
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["choices"][0]["text"].strip() and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] >= 1


def test_top_k_teacher_signal_and_chat(client, workers, uploaded):
    body = lm_body(uploaded, {"derive": {"layers": [0, 3]}}, teacher_signal={"top_k": 8})
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert any(e["data"].get("top_k") == 8 for e in events(client, job["id"]) if e["type"] == "stage")
    chat = client.post("/chat/completions", json={"model": job["result_model_id"], "max_tokens": 5, "n": 2,
                                                  "messages": [{"role": "user", "content": "the dog"}]})
    assert chat.status_code == 200, chat.text
    choices = chat.json()["choices"]
    assert len(choices) == 2 and all(c["message"]["role"] == "assistant" for c in choices)


def test_sequence_level_kd(client, workers, uploaded, tmp_path):
    body = lm_body(uploaded, {"derive": {"num_layers": 2}}, method="sequence",
                   generation={"max_new_tokens": 8, "temperature": 0.7, "n": 2})
    body["training_file"] = uploaded["prompts"]["id"]
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert any(e["data"].get("stage") == "generating" for e in events(client, job["id"]))
    (generated_id,) = job["result_files"]
    generated = client.get(f"/files/{generated_id}").json()
    assert generated["details"]["kind"] == "prompt_completion"
    assert 0 < generated["details"]["rows"] <= 2 * uploaded["prompts"]["details"]["rows"]  # n=2, empties dropped
    lines = [json.loads(line) for line in client.get(f"/files/{generated_id}/content").text.splitlines()]
    uploaded_lines = client.get(f"/files/{uploaded['prompts']['id']}/content").text.splitlines()
    prompts = {json.loads(line)["prompt"] for line in uploaded_lines}
    assert {line["prompt"] for line in lines} <= prompts and all(line["completion"].strip() for line in lines)
    assert len(lines) == generated["details"]["rows"]


def test_teacher_from_the_allowed_models_directory(client, workers, uploaded, language, service_env):
    import shutil
    from pathlib import Path

    shutil.copytree(language.teacher_dir, Path(service_env["DISTILL_MODELS_DIR"]) / "teachers" / "gpt2-tiny")
    body = lm_body(uploaded, {"derive": {"num_layers": 1}}, hyperparameters={"epochs": 1, "batch_size": 8})
    body["teacher"] = {"path": "teachers/gpt2-tiny"}
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    escape = {**body, "teacher": {"path": "../../etc"}}
    response = client.post("/distillation/jobs", json=escape)
    assert response.status_code == 422 and "outside" in response.json()["detail"]


def test_text_classifier(client, workers, tmp_path):
    from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language
    from tests.distill.hf_factories import tiny_bert_classifier

    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    sentences = synthetic_language(300, seed=5)
    labels = [int(s.split()[0] in ("these", "those", "some") or s.split()[1].endswith("s")) for s in sentences]
    teacher = train_classifier(tiny_bert_classifier(tokenizer, num_labels=2), tokenizer, sentences, labels)
    archive = tar_dir(save_model_dir(teacher, tokenizer, tmp_path / "clf"), tmp_path / "clf.tar.gz")
    records = [{"text": s, "label": y} for s, y in zip(sentences, labels)]
    teacher_file = upload(client, archive, "model")
    assert teacher_file["details"]["task"] == "text_classification"
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", records[:240]), "dataset")
    val = upload(client, write_jsonl(tmp_path / "val.jsonl", records[240:]), "dataset")
    body = {"task": "text_classification", "teacher": {"file_id": teacher_file["id"]},
            "student": {"derive": {"num_layers": 1}}, "training_file": train["id"], "validation_file": val["id"],
            "hyperparameters": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3}, "data": {"max_length": 32}}
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    model = client.get(f"/models/{job['result_model_id']}").json()
    evaluation = model["evaluation"]
    assert evaluation["teacher"]["accuracy"] > 0.6 and 0 <= evaluation["agreement"] <= 1

    texts = [r["text"] for r in records[240:250]]
    served = client.post(f"/models/{model['id']}/predict", json={"inputs": texts})
    assert served.status_code == 200, served.text
    model_dir = download_model_dir(client, model["id"], tmp_path / "download")
    local = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    local_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = local(**local_tokenizer(texts, return_tensors="pt", padding=True)).logits
    assert [p["label"] for p in served.json()["predictions"]] == logits.argmax(-1).tolist()
    wrong = client.post(f"/models/{model['id']}/predict", json={"inputs": [[1.0, 2.0]]})
    assert wrong.status_code == 422 and wrong.json()["param"] == "inputs"


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_pickled_weights_are_refused(client, language, tmp_path):
    archive = tar_dir(language.teacher_dir, tmp_path / "pickled.tar.gz",
                      extra={"model/pytorch_model.bin": b"\x80\x04\x95 not really a pickle"})
    response = upload_bytes(client, archive.read_bytes(), "pickled.tar.gz", "model")
    assert response.status_code == 422, response.text
    assert "pytorch_model.bin" in response.json()["detail"] and "safetensors" in response.json()["detail"]
    raw = upload_bytes(client, b"\x80\x04\x95 pickle", "weights.pt", "model")
    assert raw.status_code == 422 and raw.json()["code"] == "unsafe_model"


def test_archive_escape_is_refused(client, language, tmp_path):
    archive = tar_dir(language.teacher_dir, tmp_path / "escape.tar.gz", extra={"../../evil.txt": b"owned"})
    response = upload_bytes(client, archive.read_bytes(), "escape.tar.gz", "model")
    assert response.status_code == 422, response.text
    assert "../../evil.txt" in response.json()["detail"]
    assert not (tmp_path / "evil.txt").exists()


def test_mismatched_vocabulary_is_refused_at_submit(client, uploaded, tmp_path):
    from tests.distill.hf_factories import make_word_tokenizer, save_model_dir, tiny_gpt2

    other = make_word_tokenizer(["completely", "different", "words", "here", "."])
    archive = tar_dir(save_model_dir(tiny_gpt2(other, n_layer=1, n_embd=32, n_head=2), other, tmp_path / "other"),
                      tmp_path / "other.tar.gz")
    student = upload(client, archive, "model")
    response = client.post("/distillation/jobs", json=lm_body(uploaded, {"file_id": student["id"]}))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "vocabulary_mismatch" and problem["param"] == "student"
    assert '"method": "sequence"' in problem["detail"] or "sequence" in problem["detail"]


def test_text_task_needs_text_data_and_hf_teacher(client, uploaded, problem):
    tabular_teacher = upload(client, problem.teacher, "model")
    body = lm_body(uploaded, {"derive": {"num_layers": 1}})
    body["teacher"] = {"file_id": tabular_teacher["id"]}
    assert client.post("/distillation/jobs", json=body).json()["param"] == "teacher"
    tabular = upload(client, problem.train_csv, "dataset")
    body = lm_body(uploaded, {"derive": {"num_layers": 1}})
    body["training_file"] = tabular["id"]
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422 and response.json()["param"] == "training_file"
    path_teacher = lm_body(uploaded, {"derive": {"num_layers": 1}})
    path_teacher["teacher"] = {"path": "/etc"}
    response = client.post("/distillation/jobs", json=path_teacher)
    assert response.status_code == 422 and response.json()["param"] == "teacher.path"


# --- refused at submit: what the uploaded files already tell

@pytest.mark.parametrize("change, param, words", [
    (lambda b: b.update(data={"max_length": 4096}), "data.max_length", ["4096", "context"]),
    (lambda b: b.update(student={"derive": {"num_layers": 9}}), "student.derive.num_layers", ["9", "4 layers"]),
    (lambda b: b.update(student={"derive": {"layers": [0, 6]}}), "student.derive.layers[1]", ["6", "4 layers"]),
    (lambda b: b.update(student={"architecture": {"kind": "hf", "config": {"n_layer": 48, "n_embd": 4096,
                                                                          "n_head": 32}}}),
     "student.architecture.config", ["parameters", "limit"]),
    (lambda b: b.update(student={"architecture": {"kind": "hf", "config": {"no_such_key": 1}}}),
     "student.architecture.config.no_such_key", ["no_such_key"]),
])
def test_refused_at_submit_with_the_field_and_the_limit(client, uploaded, change, param, words):
    body = lm_body(uploaded, {"derive": {"num_layers": 2}})
    change(body)
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["param"] == param, problem
    for word in words:
        assert word in problem["detail"], problem["detail"]


def test_max_length_defaults_to_the_teachers_context_when_shorter(client, uploaded):
    context = uploaded["teacher"]["details"]["context_length"]
    body = lm_body(uploaded, {"derive": {"num_layers": 2}})
    del body["data"]
    job = submit(client, body)
    try:
        assert job["spec"]["data"]["max_length"] == min(256, context)
    finally:
        client.post(f"/distillation/jobs/{job['id']}/cancel")
