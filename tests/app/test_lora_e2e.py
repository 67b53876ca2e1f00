"""LoRA students end to end through the real stack: the tiny GPT-2 teacher of the ``language``
fixture, an uploaded pretrained student (same tokenizer) and a derived one, each trained as
adapters by a worker process. The default download is the merged model (from_pretrained);
``?format=adapter`` is the PEFT adapter folder, which on the original student gives the
merged model's logits; deleting the model removes the adapter. And the refusals."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories import tar_dir

from .helpers import submit, upload, wait_for
from .test_llm_e2e import download_model_dir, lm_body

LORA = {"r": 4, "alpha": 8}
FAST = {"hyperparameters": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3}}


@pytest.fixture(scope="module")
def uploads(api_url, api_key, language, tmp_path_factory):
    import httpx

    from distill.hf import load_tokenizer
    from tests.distill.hf_factories import save_model_dir, tiny_gpt2

    folder = tmp_path_factory.mktemp("lora_student")
    tokenizer = load_tokenizer(language.teacher_dir)
    student = save_model_dir(tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=7), tokenizer,
                             folder / "student")
    with httpx.Client(base_url=api_url + "/v1", timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http:
        return {"teacher": upload(http, language.teacher_archive, "model"),
                "train": upload(http, language.train_jsonl, "dataset"),
                "val": upload(http, language.val_jsonl, "dataset"),
                "student": upload(http, tar_dir(student, folder / "student.tar.gz"), "model"),
                "student_dir": student}


def download_adapter(client, model_id: str, folder: Path) -> Path:
    response = client.get(f"/models/{model_id}/download", params={"format": "adapter"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{model_id}-adapter.tar.gz"' in response.headers["content-disposition"]
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")
    (adapter,) = [p for p in folder.iterdir() if p.is_dir()]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    return adapter


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def check_lora_model(client, job: dict, base_student, tmp_path: Path) -> dict:
    """The record, the merged download and the adapter download of a finished LoRA job."""
    from peft import PeftModel

    assert job["status"] == "succeeded", job["error"]
    model = client.get(f"/models/{job['result_model_id']}").json()
    student = model["evaluation"]["student"]
    assert 0 < student["trainable_parameters"] < student["parameters"] == model["parameters"]
    lora = model["architecture"]["lora"]
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == (4, 8, "all-linear")
    assert lora["trainable_parameters"] == student["trainable_parameters"] and lora["adapter_sha256"]

    merged_dir = download_model_dir(client, model["id"], tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    assert "LoRA r=4" in (merged_dir / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # no peft needed
    adapter = download_adapter(client, model["id"], tmp_path / "adapter")
    adapted = PeftModel.from_pretrained(base_student, adapter)
    ids = torch.tensor([[3, 10, 20, 30, 4, 5]])
    merged_logits = logits(merged, ids)
    torch.testing.assert_close(logits(adapted, ids), merged_logits, atol=1e-5, rtol=1e-5)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None and config["peft_type"] == "LORA"  # no server path
    return model


def test_pretrained_student_with_lora(client, workers, uploads, service_env, tmp_path):
    from distill.hf import load_causal_lm

    body = lm_body(uploads, {"file_id": uploads["student"]["id"], "lora": LORA}, **FAST)
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    original = load_causal_lm(uploads["student_dir"])
    ids = torch.tensor([[3, 10, 20, 30, 4, 5]])
    before = logits(original, ids)
    model = check_lora_model(client, job, load_causal_lm(uploads["student_dir"]), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(download_model_dir(client, model["id"], tmp_path / "again"))
    assert not torch.allclose(logits(merged, ids), before)  # the adapters learned something

    folder = Path(service_env["DISTILL_ARTIFACTS_DIR"]) / "models" / model["id"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert client.delete(f"/models/{model['id']}").status_code == 200
    assert not folder.exists()
    gone = client.get(f"/models/{model['id']}/download", params={"format": "adapter"})
    assert gone.status_code == 404 and gone.json()["param"] == "model_id"


def test_derived_student_with_lora_and_format_refusals(client, workers, uploads, language, tmp_path):
    from distill.hf import derive_student, load_causal_lm

    body = lm_body(uploads, {"derive": {"num_layers": 2}, "lora": LORA}, **FAST)
    job = wait_for(client, submit(client, body)["id"], timeout=300)
    # The adapter applies to the derived student, which derive rebuilds from the teacher.
    model = check_lora_model(client, job, derive_student(load_causal_lm(language.teacher_dir), num_layers=2),
                             tmp_path)

    plain = wait_for(client, submit(client, lm_body(uploads, {"derive": {"num_layers": 1}}, **FAST))["id"],
                     timeout=300)
    assert plain["status"] == "succeeded", plain["error"]
    missing = client.get(f"/models/{plain['result_model_id']}/download", params={"format": "adapter"})
    assert missing.status_code == 404, missing.text
    assert missing.json()["param"] == "format" and "LoRA adapter" in missing.json()["detail"]
    assert "lora" not in client.get(f"/models/{plain['result_model_id']}").json()["architecture"]
    unknown = client.get(f"/models/{model['id']}/download", params={"format": "onnx"})
    assert unknown.status_code == 422 and unknown.json()["param"] == "format"
    default = client.get(f"/models/{model['id']}/download", params={"format": "model"})
    assert default.status_code == 200 and default.headers["x-content-sha256"] == model["sha256"]


def test_lora_with_an_architecture_student_is_refused(client, uploads):
    body = lm_body(uploads, {"architecture": {"kind": "hf", "config": {"n_layer": 1}}, "lora": LORA})
    response = client.post("/distillation/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["param"] == "student.lora"
