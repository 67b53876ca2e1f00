"""On-policy distillation end to end through the real stack: the `language` teacher uploaded
as an archive, a prompts-only training file and a prompt/completion validation file, a job
with method on_policy (lambda 1: the student writes every completion) run by a worker
process; its reverse KL on its own samples falls, and the student downloads and loads with
``from_pretrained``. Plus what the API refuses at submit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.factories import write_jsonl

from .helpers import events, submit, upload, wait_for
from .test_llm_e2e import download_model_dir


@pytest.fixture(scope="module")
def uploaded(api_url, api_key, language, tmp_path_factory):
    """The teacher; 32 prompts alone (training); 24 prompt/completion pairs (validation)."""
    import httpx

    from tests.distill.hf_factories import synthetic_language

    folder = tmp_path_factory.mktemp("on_policy")
    prompts = [{"prompt": " ".join(s.split()[:2])} for s in synthetic_language(32, seed=11)]
    pairs = [json.loads(line) for line in language.prompts_jsonl.read_text().splitlines()[:24]]
    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, language.teacher_archive, "model"),
                "prompts": upload(http, write_jsonl(folder / "prompts.jsonl", prompts), "dataset"),
                "pairs": upload(http, write_jsonl(folder / "pairs.jsonl", pairs), "dataset")}


def on_policy_body(uploaded: dict, **on_policy) -> dict:
    return {"task": "causal_lm", "method": "on_policy", "teacher": {"file_id": uploaded["teacher"]["id"]},
            "student": {"derive": {"num_layers": 1}}, "training_file": uploaded["prompts"]["id"],
            "validation_file": uploaded["pairs"]["id"],
            "on_policy": {"lambda": 1.0, "max_new_tokens": 10, "temperature": 1.0, **on_policy},
            "hyperparameters": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3},
            "data": {"max_length": 32}}


def test_on_policy_job_lowers_the_students_reverse_kl(client, workers, uploaded, tmp_path):
    assert uploaded["prompts"]["details"]["kind"] == "prompt" and uploaded["pairs"]["details"]["kind"] == \
        "prompt_completion"
    job = wait_for(client, submit(client, on_policy_body(uploaded))["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["loss"]["type"] == "reverse_kl"  # the method's default

    job_events = events(client, job["id"])
    stage = next(e["data"] for e in job_events if e["type"] == "stage" and e["data"]["stage"] == "on_policy")
    assert stage["lambda"] == 1.0 and stage["max_new_tokens"] == 10
    epochs = [e["data"] for e in job_events if e["type"] == "metrics"]
    assert [record["epoch"] for record in epochs] == [1, 2, 3]
    curve = [record["validation_on_policy_reverse_kl"] for record in epochs]
    assert all(record["validation_teacher_nll"] > 0 for record in epochs)

    model = client.get(f"/models/{job['result_model_id']}").json()
    evaluation = model["evaluation"]
    before, after = evaluation["on_policy"]["before"], evaluation["on_policy"]["after"]
    print(f"\non-policy reverse KL: before {before['reverse_kl']:.4f}, per epoch {[round(v, 4) for v in curve]}; "
          f"teacher NLL of the samples {before['teacher_nll']:.3f} -> {after['teacher_nll']:.3f}")
    assert curve[-1] < 0.75 * before["reverse_kl"] and after["reverse_kl"] == curve[-1]
    # The validation pairs have completions: the usual report is there beside the on-policy one.
    assert evaluation["student"]["perplexity"] > 0 and 0 <= evaluation["top1_agreement"] <= 1
    assert model["architecture"]["num_layers"] == 1

    model_dir = download_model_dir(client, model["id"], tmp_path)
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        output = student.generate(**tokenizer(["the cat"], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > 2 and "on_policy" in (model_dir / "README.md").read_text()


def test_prompts_only_need_lambda_one(client, uploaded):
    response = client.post("/distillation/jobs", json=on_policy_body(uploaded, **{"lambda": 0.5}))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["param"] == "training_file" and "lambda" in problem["detail"], problem


def test_on_policy_is_for_causal_lm(client, uploaded):
    body = {**on_policy_body(uploaded), "task": "text_classification"}
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert "on_policy" in problem["detail"] and "text_classification" in problem["detail"], problem


def test_the_refusal_names_the_method(client, uploaded):
    body = {**on_policy_body(uploaded), "task": "text_classification"}
    assert client.post("/distillation/jobs", json=body).json()["param"] == "method"
