"""LoRA students: only the adapters (and a classifier's head) train; the export is the merged
model, equal to the adapted one; the adapter folder loads with peft on the original student
and gives the merged model's logits; a LoRA run resumes bit for bit; bad targets are refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distill.errors import SpecError
from distill.hf import derive_student, load_causal_lm, load_classifier
from distill.loop import train
from distill.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_dir
from distill.recipes import RunContext, get_recipe
from distill.spec import JobSpec
from distill.train import run_distillation
from tests.distill.resume_helpers import assert_same_tensors, interrupt_inside_epoch_two
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_bert_classifier, tiny_gpt2)

HP = {"epochs": 2, "batch_size": 4, "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer, root / "lm")
    save_model_dir(tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=1), tokenizer,
                   root / "lm_student")
    bert = {"num_labels": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    save_model_dir(tiny_bert_classifier(tokenizer, num_hidden_layers=2, **bert), tokenizer, root / "bert")
    save_model_dir(tiny_bert_classifier(tokenizer, num_hidden_layers=1, seed=1, **bert), tokenizer,
                   root / "bert_student")
    sentences = synthetic_language(60, seed=3)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (root / "labels.jsonl").write_text("".join(
        json.dumps({"text": s, "label": int(" and " in s)}) + "\n" for s in sentences))
    return root


def _spec(files, task: str, student: dict, **extra) -> JobSpec:
    data = "text.jsonl" if task == "causal_lm" else "labels.jsonl"
    teacher = "lm" if task == "causal_lm" else "bert"
    return JobSpec.from_dict({"task": task, "teacher": str(files / teacher), "training_file": str(files / data),
                              "student": student, "validation_split": 0.25, "hyperparameters": HP,
                              "data": {"max_length": 16}, **extra})


def _prepare(spec: JobSpec, out):
    """What run_distillation does up to training, keeping the recipe in hand."""
    ctx = RunContext(device=torch.device("cpu"), out_dir=out, on_event=lambda *_: None, should_stop=lambda: False)
    recipe = get_recipe(spec.task, spec.method, spec.loss.type)(spec, ctx)
    torch.manual_seed(spec.hyperparameters.seed)
    recipe.prepare()
    return recipe, ctx


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(base weights under their original names, adapter weights, trained head copies)."""
    base, adapters, heads = {}, {}, {}
    for name, value in state.items():
        if ".lora_" in name:
            adapters[name] = value
        elif ".modules_to_save." in name:
            heads[name.replace(".modules_to_save.default", "")] = value
        else:
            base[name.replace(".base_layer", "").replace(".original_module", "")] = value
    return base, adapters, heads


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_causal_lm_trains_adapters_only_and_exports_merged_model_and_adapter(files, tmp_path):
    student_dir = files / "lm_student"
    original = load_causal_lm(student_dir).state_dict()
    spec = _spec(files, "causal_lm", {"path": str(student_dir), "lora": {"r": 4, "alpha": 8}})
    recipe, ctx = _prepare(spec, tmp_path)
    model = recipe.model
    assert recipe.student.split  # the body/head split (chunked loss) still holds on the adapted model
    _, adapters_before, _ = _split({k: v.clone() for k, v in model.state_dict().items()})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(adapters_before) == len(trainable) == 2 * 4  # A and B for c_attn, c_proj, c_fc, mlp.c_proj

    history = train(recipe, ctx, spec.hyperparameters, checkpoint_interval_s=3600)

    base, adapters, _ = _split(model.state_dict())
    assert base.keys() == original.keys()
    for name, value in original.items():  # the frozen student, bit for bit
        assert torch.equal(base[name], value), name
    for name, value in adapters.items():
        assert not torch.equal(value, adapters_before[name]), name  # every adapter matrix trained
    ids = recipe.val_tokens["input_ids"][:2]
    assert model.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          pad_token_id=recipe.tokenizer.pad_token_id).shape == (1, 7)
    adapted_logits = _logits(model, ids)
    assert not torch.allclose(adapted_logits, _logits(load_causal_lm(student_dir), ids))

    evaluation = recipe.evaluate()
    export = recipe.export(tmp_path / "final", evaluation, history)

    n_adapter = sum(v.numel() for v in adapters.values())
    n_student = sum(p.numel() for p in load_causal_lm(student_dir).parameters())
    assert evaluation["student"]["trainable_parameters"] == n_adapter < evaluation["student"]["parameters"]
    assert evaluation["student"]["parameters"] == n_student == export.parameters
    lora = export.architecture["lora"]
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == (4, 8, "all-linear")
    assert (lora["trainable_parameters"], lora["total_parameters"], lora["adapted_modules"]) == (n_adapter,
                                                                                                 n_student, 4)
    assert "LoRA r=4, alpha=8" in (export.model_path / "README.md").read_text()

    # final/: a plain transformers model (no adapter tensors) with the adapted model's logits.
    assert load_file(str(export.model_path / "model.safetensors")).keys() <= original.keys()
    merged = AutoModelForCausalLM.from_pretrained(export.model_path)
    merged_logits = _logits(merged, ids)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)

    # final-adapter/: PEFT's folder; on the original student it gives the merged model's logits.
    assert export.adapter_path == adapter_dir(export.model_path) == tmp_path / "final-adapter"
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in export.adapter_path.iterdir()}
    config = json.loads((export.adapter_path / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] is None and str(files) not in json.dumps(config)
    adapted = PeftModel.from_pretrained(load_causal_lm(student_dir), export.adapter_path)
    torch.testing.assert_close(_logits(adapted, ids), merged_logits, atol=1e-5, rtol=1e-5)


def test_text_classifier_trains_adapters_and_head(files, tmp_path):
    student_dir = files / "bert_student"
    original = load_classifier(student_dir).state_dict()
    spec = _spec(files, "text_classification", {"path": str(student_dir), "lora": {"r": 4, "alpha": 8}})
    recipe, ctx = _prepare(spec, tmp_path)
    model = recipe.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {"classifier.modules_to_save.default.weight",
                                                           "classifier.modules_to_save.default.bias"}

    history = train(recipe, ctx, spec.hyperparameters, checkpoint_interval_s=3600)

    base, adapters, heads = _split(model.state_dict())
    assert base.keys() == original.keys()
    for name, value in original.items():  # the frozen body, and the head's original copy
        assert torch.equal(base[name], value), name
    assert adapters and heads.keys() == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(heads["classifier.weight"], original["classifier.weight"])  # the head trained
    ids = recipe.val_tokens["input_ids"][:3]
    adapted_logits = _logits(model, ids)

    evaluation = recipe.evaluate()
    export = recipe.export(tmp_path / "final", evaluation, history)
    path = export.model_path
    lora = export.architecture["lora"]
    assert lora["trained_modules"] == ["classifier"] and lora["adapted_modules"] == 7  # q k v o, up, down, pooler
    assert lora["trainable_parameters"] == sum(v.numel() for v in [*adapters.values(), *heads.values()])
    merged = AutoModelForSequenceClassification.from_pretrained(path)
    merged_logits = _logits(merged, ids)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.classifier.weight, heads["classifier.weight"])
    adapted = PeftModel.from_pretrained(load_classifier(student_dir), adapter_dir(path))
    torch.testing.assert_close(_logits(adapted, ids), merged_logits, atol=1e-5, rtol=1e-5)


def test_lora_run_resumes_bit_for_bit(files, tmp_path):
    # A derived student (the teacher's layer 1) with adapter dropout: the checkpointed RNG matters.
    spec = _spec(files, "causal_lm", {"derive": {"layers": [1]}, "lora": {"r": 2, "alpha": 4, "dropout": 0.1}},
                 hyperparameters={**HP, "epochs": 3})
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=3600)

    out = tmp_path / "interrupted"
    interrupt_inside_epoch_two(spec, out)
    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True)

    assert resumed.history == straight.history
    assert_same_tensors(straight.model_path / "model.safetensors", resumed.model_path / "model.safetensors")
    assert_same_tensors(straight.adapter_path / ADAPTER_WEIGHTS, resumed.adapter_path / ADAPTER_WEIGHTS)
    # The adapter applies to the derived student, which derive rebuilds from the teacher.
    base = derive_student(load_causal_lm(files / "lm"), layers=[1])
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    adapted = PeftModel.from_pretrained(base, resumed.adapter_path)
    torch.testing.assert_close(_logits(adapted, ids),
                               _logits(AutoModelForCausalLM.from_pretrained(resumed.model_path), ids),
                               atol=1e-5, rtol=1e-5)
    evaluation = resumed.evaluation["student"]
    assert 0 < evaluation["trainable_parameters"] < evaluation["parameters"]


@pytest.mark.parametrize("lora, message", [
    ({"target_modules": ["no_such_module"]}, "no_such_module"),
    ({"target_modules": ["lm_head"]}, "shares its weights"),  # tied to the embeddings: merging would change both
])
def test_bad_targets_are_refused_with_the_field(files, tmp_path, lora, message):
    spec = _spec(files, "causal_lm", {"derive": {"num_layers": 1}, "lora": lora})
    with pytest.raises(SpecError, match=message) as caught:
        run_distillation(spec, tmp_path, device="cpu")
    assert caught.value.param == "student.lora.target_modules"


def test_lora_with_a_random_weight_student_is_refused(files):
    with pytest.raises(SpecError) as caught:
        _spec(files, "causal_lm", {"architecture": {"kind": "hf", "config": {"n_layer": 1}}, "lora": {"r": 4}})
    assert caught.value.param == "student.lora"
