"""POST /v1/distillation/jobs/estimate against the live API: the loop's own step count, rows and
tokens, FLOPs that follow the stated formulas (and scale with epochs), an estimated duration,
the submit checks (422 naming the field), and nothing queued."""

from __future__ import annotations

import math

import pytest

from tests.factories import tar_dir, write_jsonl

from .helpers import job_body, upload

ESTIMATE = "/distillation/jobs/estimate"


def _job_ids(client) -> list[str]:
    return [j["id"] for j in client.get("/distillation/jobs", params={"limit": 100}).json()["data"]]


@pytest.fixture(scope="module")
def mlp_files(api_url, api_key, problem):
    import httpx

    with httpx.Client(base_url=api_url + "/v1", timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, problem.teacher, "model"), "train": upload(http, problem.train_csv, "dataset"),
                "val": upload(http, problem.val_csv, "dataset")}


@pytest.fixture(scope="module")
def lm(api_url, api_key, tmp_path_factory):
    """A tiny (untrained: only its size matters) GPT-2 teacher with a word tokenizer, and text data."""
    import httpx

    from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language, \
        tiny_gpt2

    folder = tmp_path_factory.mktemp("estimate-lm")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    teacher_dir = save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, folder / "teacher")
    sentences = synthetic_language(120, seed=5)
    texts = [" ".join(sentences[i:i + 3]) for i in range(0, 90, 3)]  # 30 documents
    with httpx.Client(base_url=api_url + "/v1", timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"tokenizer": tokenizer, "texts": texts,
                "teacher": upload(http, tar_dir(teacher_dir, folder / "teacher.tar.gz"), "model"),
                "train": upload(http, write_jsonl(folder / "train.jsonl", [{"text": t} for t in texts]), "dataset"),
                "val": upload(http, write_jsonl(folder / "val.jsonl", [{"text": t} for t in texts[:5]]), "dataset"),
                "prompts": upload(http, write_jsonl(folder / "prompts.jsonl", [
                    {"prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])}
                    for s in sentences[:20]]), "dataset")}


def test_mlp_estimate_counts_the_loops_steps_and_flops(client, mlp_files, problem):
    before = _job_ids(client)
    rows = mlp_files["train"]["details"]["rows"]
    teacher_parameters = mlp_files["teacher"]["details"]["parameters"]
    hidden = 16  # job_body's student
    student_parameters = (problem.features * hidden + hidden) + (hidden * problem.classes + problem.classes)
    body = job_body(mlp_files["teacher"]["id"], mlp_files["train"]["id"], mlp_files["val"]["id"],
                    epochs=3, batch_size=32, gradient_accumulation_steps=2)
    estimates = {}
    for epochs in (3, 6):
        body["hyperparameters"]["epochs"] = epochs
        response = client.post(ESTIMATE, json=body)
        assert response.status_code == 200, response.text
        estimates[epochs] = response.json()
    three, six = estimates[3], estimates[6]
    assert three["object"] == "distillation.job.estimate" and three["rows"] == three["dataset_rows"] == rows
    assert three["tokens"] is None
    assert three["steps_per_epoch"] == math.ceil(math.ceil(rows / 32) / 2)
    assert three["steps"] == 3 * three["steps_per_epoch"] and six["steps"] == 2 * three["steps"]
    assert three["teacher_parameters"] == teacher_parameters and three["student_parameters"] == student_parameters
    assert three["teacher_flops"] == 2 * teacher_parameters * rows  # logits computed once, before training
    assert three["student_flops"] == 6 * student_parameters * rows * 3
    assert six["student_flops"] == 2 * three["student_flops"] and six["teacher_flops"] == three["teacher_flops"]
    assert three["total_flops"] == three["teacher_flops"] + three["student_flops"]
    assert 0 < three["estimated_seconds"] < six["estimated_seconds"]
    assert three["device"] and three["flops_per_second"] > 0 and any("FLOP/s" in a for a in three["assumptions"])
    assert _job_ids(client) == before  # nothing was created, nothing queued


def test_estimate_holds_out_the_validation_split(client, mlp_files):
    body = job_body(mlp_files["teacher"]["id"], mlp_files["train"]["id"], epochs=1, batch_size=10)
    body["validation_split"] = 0.25
    estimate = client.post(ESTIMATE, json=body).json()
    rows = mlp_files["train"]["details"]["rows"]
    assert estimate["dataset_rows"] == rows and estimate["rows"] == rows - round(rows * 0.25)
    assert estimate["steps"] == math.ceil(estimate["rows"] / 10)


def test_estimate_refuses_what_a_submit_refuses(client, mlp_files):
    before = _job_ids(client)
    body = job_body(mlp_files["teacher"]["id"], mlp_files["teacher"]["id"])  # a model as the training data
    response = client.post(ESTIMATE, json=body)
    assert response.status_code == 422 and response.json()["param"] == "training_file"
    body = job_body(mlp_files["teacher"]["id"], mlp_files["train"]["id"], epochs=0)
    response = client.post(ESTIMATE, json=body)
    assert response.status_code == 422 and response.json()["param"] == "hyperparameters.epochs"
    assert _job_ids(client) == before


@pytest.mark.parametrize("packing", [True, False])
def test_causal_lm_estimate_counts_tokens(client, lm, packing):
    before = _job_ids(client)
    max_length = 16
    body = {"task": "causal_lm", "teacher": {"file_id": lm["teacher"]["id"]}, "student": {"derive": {"num_layers": 1}},
            "training_file": lm["train"]["id"], "validation_file": lm["val"]["id"],
            "hyperparameters": {"epochs": 2, "batch_size": 4}, "data": {"max_length": max_length, "packing": packing}}
    first = client.post(ESTIMATE, json=body)
    assert first.status_code == 200, first.text
    body["hyperparameters"]["epochs"] = 4
    second = client.post(ESTIMATE, json=body).json()
    first = first.json()

    # every document is its tokens + eos; the sample (first 256 records) covers all 30 of them
    lengths = [len(lm["tokenizer"](t, add_special_tokens=False)["input_ids"]) + 1 for t in lm["texts"]]
    if packing:
        assert first["tokens"] == sum(lengths) and first["rows"] == math.ceil(sum(lengths) / max_length)
    else:
        assert first["tokens"] == sum(min(n, max_length) for n in lengths) and first["rows"] == len(lm["texts"])
    assert "tokenizer" in first["tokens_method"]
    assert first["steps"] == 2 * math.ceil(first["rows"] / 4) and second["steps"] == 2 * first["steps"]
    teacher, student = first["teacher_parameters"], first["student_parameters"]
    assert teacher == lm["teacher"]["details"]["parameters"] and 0 < student < teacher  # one of two layers
    assert first["teacher_flops"] == 2 * teacher * first["tokens"] * 2  # the teacher runs every epoch
    assert first["student_flops"] == 6 * student * first["tokens"] * 2
    assert second["teacher_flops"] == 2 * first["teacher_flops"]
    assert second["student_flops"] == 2 * first["student_flops"]
    assert first["estimated_seconds"] < second["estimated_seconds"]
    assert _job_ids(client) == before


def test_generation_is_counted_for_sequence_and_on_policy(client, lm):
    base = {"task": "causal_lm", "teacher": {"file_id": lm["teacher"]["id"]}, "student": {"derive": {"num_layers": 1}},
            "training_file": lm["prompts"]["id"], "validation_file": lm["prompts"]["id"],
            "hyperparameters": {"epochs": 3, "batch_size": 4}, "data": {"max_length": 32}}
    sequence = client.post(ESTIMATE, json={**base, "method": "sequence", "generation": {"max_new_tokens": 8, "n": 2}})
    assert sequence.status_code == 200, sequence.text
    sequence = sequence.json()
    assert sequence["rows"] == 2 * 20 and sequence["generated_tokens"] == 20 * 2 * 8  # n completions per prompt
    assert sequence["teacher_passes"] == 0  # the student learns from the teacher's text, not its logits
    assert sequence["generation_flops"] == 2 * sequence["teacher_parameters"] * sequence["generated_tokens"]
    assert sequence["teacher_flops"] == sequence["generation_flops"]

    on_policy = client.post(ESTIMATE, json={**base, "method": "on_policy",
                                            "on_policy": {"lambda": 0.5, "max_new_tokens": 8}})
    assert on_policy.status_code == 200, on_policy.text
    on_policy = on_policy.json()
    assert on_policy["generated_tokens"] == round(20 * 0.5 * 8) * 3  # the student samples half the batches
    assert on_policy["generation_flops"] == 2 * on_policy["student_parameters"] * on_policy["generated_tokens"]
    assert on_policy["total_flops"] == on_policy["teacher_flops"] + on_policy["student_flops"] + \
        on_policy["generation_flops"]
