"""Cross-tokenizer distillation (loss.type "uld") end to end through the real stack: the tiny
GPT-2 teacher of the ``language`` fixture and an uploaded pretrained Llama student whose
tokenizer differs from the teacher's; a worker process trains it, the download loads with
``from_pretrained`` and carries the student's tokenizer. And the combinations the API refuses."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.factories import tar_dir

from .helpers import events, submit, upload, wait_for
from .test_llm_e2e import download_model_dir, lm_body


@pytest.fixture(scope="module")
def uploads(api_url, api_key, language, tmp_path_factory):
    import httpx

    from distill.hf import load_tokenizer
    from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, tiny_gpt2, tiny_llama

    folder = tmp_path_factory.mktemp("uld_students")
    # The student's own tokenizer: the teacher's words in another order, plus words it lacks.
    tokenizer = make_word_tokenizer(list(reversed(SYNTHETIC_WORDS)) + ["zebra", "violet"])
    student = tiny_llama(tokenizer, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128)
    own = save_model_dir(student, tokenizer, folder / "own")
    teacher_tokenizer = load_tokenizer(language.teacher_dir)
    shared = save_model_dir(tiny_gpt2(teacher_tokenizer, n_layer=1, n_embd=32, n_head=2), teacher_tokenizer,
                            folder / "shared")
    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, language.teacher_archive, "model"),
                "train": upload(http, language.train_jsonl, "dataset"),
                "val": upload(http, language.val_jsonl, "dataset"),
                "own": upload(http, tar_dir(own, folder / "own.tar.gz"), "model"), "own_dir": own,
                "shared": upload(http, tar_dir(shared, folder / "shared.tar.gz"), "model")}


def uld_body(uploads: dict, student: dict, **extra) -> dict:
    return lm_body(uploads, student, loss={"type": "uld"}, **extra)


def test_uld_job_trains_a_student_with_its_own_tokenizer(client, workers, uploads, language, tmp_path):
    job = submit(client, uld_body(uploads, {"file_id": uploads["own"]["id"]}))
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    job_events = events(client, job["id"])
    epochs = [e["data"] for e in job_events if e["type"] == "metrics"]
    assert len(epochs) == 3
    assert epochs[-1]["validation_loss"] < epochs[0]["validation_loss"]
    assert epochs[-1]["validation_uld"] < epochs[0]["validation_uld"]
    (alignment,) = [e["data"] for e in job_events if e["type"] == "alignment"]
    assert alignment["aligned_positions"] > 0

    model = client.get(f"/models/{job['result_model_id']}").json()
    evaluation = model["evaluation"]
    assert evaluation["student"]["perplexity"] < evaluation["student"]["perplexity_before_training"]
    assert evaluation["uld"]["validation_uld"] < evaluation["uld"]["validation_uld_before_training"]
    assert evaluation["teacher"]["perplexity"] > 1 and evaluation["top1_agreement"] is None

    model_dir = download_model_dir(client, model["id"], tmp_path)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert student.config.model_type == "llama"
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(uploads["own_dir"]).get_vocab()
    assert tokenizer.get_vocab() != AutoTokenizer.from_pretrained(language.teacher_dir).get_vocab()
    assert "uld" in (model_dir / "README.md").read_text()


@pytest.mark.parametrize("student, extra, param", [
    ({"derive": {"num_layers": 2}}, {}, "loss.type"),
    ("shared", {}, "loss.type"),
    ("own", {"teacher_signal": {"top_k": 8}}, "teacher_signal.top_k"),
])
def test_uld_refusals(client, uploads, student, extra, param):
    if isinstance(student, str):
        student = {"file_id": uploads[student]["id"]}
    response = client.post("/distillation/jobs", json=uld_body(uploads, student, **extra))
    assert response.status_code == 422, response.text
    assert response.json()["param"] == param, response.json()
