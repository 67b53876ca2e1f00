"""Intermediate-layer distillation (``intermediate``) end to end through the real stack: a
causal-LM job whose student is narrower than the tiny GPT-2 teacher of the ``language``
fixture (hidden states matched through learned projections), a text-classification job with
the hidden-state MSE and the attention KL, and what the API refuses at submit."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.factories import tar_dir, train_classifier, write_jsonl

from .helpers import events, submit, upload, wait_for
from .test_llm_e2e import download_model_dir, lm_body


@pytest.fixture(scope="module")
def uploads(api_url, api_key, language, tmp_path_factory):
    import httpx

    from distill.hf import load_tokenizer
    from tests.distill.hf_factories import save_model_dir, tiny_gpt2

    folder = tmp_path_factory.mktemp("intermediate_students")
    tokenizer = load_tokenizer(language.teacher_dir)
    # The teacher has 4 heads; this pretrained student 2 (its details carry num_attention_heads).
    two_heads = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, folder / "two_heads")
    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, language.teacher_archive, "model"),
                "train": upload(http, language.train_jsonl, "dataset"),
                "val": upload(http, language.val_jsonl, "dataset"),
                "prompts": upload(http, language.prompts_jsonl, "dataset"),
                "two_heads": upload(http, tar_dir(two_heads, folder / "two_heads.tar.gz"), "model")}


NARROW = {"architecture": {"kind": "hf", "config": {"n_layer": 2, "n_embd": 32, "n_head": 2}}}


def epoch_records(client, job_id: str) -> list[dict]:
    return [e["data"] for e in events(client, job_id) if e["type"] == "metrics"]


def test_causal_lm_with_a_narrower_student_matches_hidden_states_through_projections(client, workers, uploads,
                                                                                     tmp_path):
    body = lm_body(uploads, NARROW, intermediate={"type": "cosine", "weight": 1.0})
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    epochs = epoch_records(client, job["id"])
    assert len(epochs) == 3
    first, last = epochs[0]["validation_intermediate_loss"], epochs[-1]["validation_intermediate_loss"]
    print(f"causal_lm cosine validation_intermediate_loss: epoch 1 {first:.4f} -> epoch 3 {last:.4f}")
    assert 0 < last < first <= 2  # 1 - cos lies in [0, 2]

    model = client.get(f"/models/{job['result_model_id']}").json()
    report = model["evaluation"]["intermediate"]
    assert report["pairs"] == [[0, 1], [1, 3]]  # uniform: 2 student blocks onto 4 teacher blocks
    assert report["projections"] is True and report["projected_pairs"] == [[0, 1], [1, 3]]  # widths 32 → 64
    assert model["evaluation"]["student"]["perplexity"] < model["evaluation"]["student"]["perplexity_before_training"]

    model_dir = download_model_dir(client, model["id"], tmp_path)
    tensors = load_file(str(model_dir / "model.safetensors"))
    assert not any("projection" in name or name.startswith(("intermediate.", "student.")) for name in tensors)
    student, loading = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["missing_keys"]
    assert student.config.n_embd == 32 and student.config.n_layer == 2


def test_text_classification_with_mse_and_attention(client, workers, tmp_path):
    from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                            tiny_bert_classifier)

    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    sentences = synthetic_language(200, seed=5)
    labels = [int(s.split()[0] in ("these", "those", "some") or s.split()[1].endswith("s")) for s in sentences]
    teacher = train_classifier(tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2, hidden_size=32,
                                                    num_attention_heads=2, intermediate_size=64),
                               tokenizer, sentences, labels, steps=40)
    archive = tar_dir(save_model_dir(teacher, tokenizer, tmp_path / "clf"), tmp_path / "clf.tar.gz")
    records = [{"text": s, "label": y} for s, y in zip(sentences, labels)]
    teacher_file = upload(client, archive, "model")
    assert teacher_file["details"]["num_attention_heads"] == 2
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", records[:160]), "dataset")
    val = upload(client, write_jsonl(tmp_path / "val.jsonl", records[160:]), "dataset")
    body = {"task": "text_classification", "teacher": {"file_id": teacher_file["id"]},
            "student": {"derive": {"num_layers": 1}}, "training_file": train["id"], "validation_file": val["id"],
            "hyperparameters": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3}, "data": {"max_length": 32},
            "intermediate": {"type": "mse", "attention": True, "weight": 0.5}}
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    epochs = epoch_records(client, job["id"])
    first, last = epochs[0]["validation_intermediate_loss"], epochs[-1]["validation_intermediate_loss"]
    print(f"text_classification mse validation_intermediate_loss: epoch 1 {first:.4f} -> epoch 3 {last:.4f}; "
          f"attention KL {epochs[0]['validation_attention_kl']:.5f} -> {epochs[-1]['validation_attention_kl']:.5f}")
    assert last < first and all(e["validation_attention_kl"] >= 0 for e in epochs)

    model = client.get(f"/models/{job['result_model_id']}").json()
    report = model["evaluation"]["intermediate"]
    assert report["attention"] is True and report["attention_heads"] == 2
    assert report["pairs"] == [[0, 1]] and report["projections"] is False  # a derived student: same width
    model_dir = download_model_dir(client, model["id"], tmp_path / "download")
    _, loading = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["missing_keys"]
    served = client.post(f"/models/{model['id']}/predict", json={"inputs": [records[170]["text"]]})
    assert served.status_code == 200, served.text


# ---- refused at submit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, param, words", [
    # 4 teacher heads vs an architecture override of 2
    (lambda b, u: b.update(intermediate={"attention": True}), "intermediate.attention", ["2 heads", "4"]),
    # ... and vs a pretrained student's 2 (from its uploaded details)
    (lambda b, u: b.update(intermediate={"attention": True}, student={"file_id": u["two_heads"]["id"]}),
     "intermediate.attention", ["2 heads", "4"]),
    (lambda b, u: b.update(intermediate={"layers": [[2, 3]]}), "intermediate.layers[0][0]", ["student", "2 layers"]),
    (lambda b, u: b.update(intermediate={"layers": [[1, 4]]}), "intermediate.layers[0][1]", ["teacher", "4 layers"]),
    (lambda b, u: b.update(intermediate={}, method="sequence", training_file=u["prompts"]["id"]), "intermediate",
     ["causal_lm (method token)"]),
])
def test_refused_at_submit_with_the_field(client, uploads, change, param, words):
    body = lm_body(uploads, NARROW)
    change(body, uploads)
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["param"] == param, problem
    for word in words:
        assert word in problem["detail"], problem["detail"]


def test_attention_with_equal_heads_is_accepted(client, uploads):
    body = lm_body(uploads, {"architecture": {"kind": "hf", "config": {"n_layer": 2, "n_embd": 32}}},
                   intermediate={"attention": True, "layers": [[1, 3]]})  # 4 heads of width 8
    job = submit(client, body)
    assert job["spec"]["intermediate"] == {"weight": 1.0, "type": "cosine", "layers": [[1, 3]], "attention": True}
    client.post(f"/distillation/jobs/{job['id']}/cancel")
