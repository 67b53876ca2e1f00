"""Every task resumes: a run stopped mid-epoch and resumed from its step checkpoint ends
exactly where an uninterrupted run with the same seed ends (identical on CPU: same
weights bit for bit, same per-epoch records). Students here use dropout, so the RNG
state in the checkpoint matters; the sequence-level job samples its teacher."""

from __future__ import annotations

import json

import pytest

from distill.spec import JobSpec
from distill.train import run_distillation
from tests.distill.resume_helpers import assert_same_tensors, interrupt_inside_epoch_two
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_bert_classifier, tiny_gpt2)

EPOCHS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer, root / "lm")
    save_model_dir(tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64), tokenizer, root / "bert")
    sentences = synthetic_language(60, seed=3)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])}) + "\n"
        for s in sentences[:24]))
    (root / "labels.jsonl").write_text("".join(
        json.dumps({"text": s, "label": int(" and " in s)}) + "\n" for s in sentences))
    return root


def _spec(files, case: str) -> JobSpec:
    dropout = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "n_layer": 1}
    hp = {"epochs": EPOCHS, "batch_size": 4, "learning_rate": 3e-3}
    common = {"validation_split": 0.25, "hyperparameters": hp, "data": {"max_length": 16}}
    specs = {
        "causal_lm": {"task": "causal_lm", "teacher": str(files / "lm"), "training_file": str(files / "text.jsonl"),
                      "student": {"architecture": {"kind": "hf", "config": dropout}}},
        "causal_lm_top_k": {"task": "causal_lm", "teacher": str(files / "lm"),
                            "training_file": str(files / "text.jsonl"), "student": {"derive": {"num_layers": 1}},
                            "teacher_signal": {"top_k": 8}, "loss": {"type": "reverse_kl"},
                            "hyperparameters": {**hp, "gradient_accumulation_steps": 2}},
        "causal_lm_sequence": {"task": "causal_lm", "method": "sequence", "teacher": str(files / "lm"),
                               "training_file": str(files / "prompts.jsonl"),
                               "student": {"architecture": {"kind": "hf", "config": dropout}},
                               "generation": {"max_new_tokens": 6, "temperature": 0.9}},
        "text_classification": {"task": "text_classification", "teacher": str(files / "bert"),
                                "training_file": str(files / "labels.jsonl"),
                                "student": {"architecture": {"kind": "hf", "config": {
                                    "num_hidden_layers": 1, "hidden_dropout_prob": 0.1}}}},
    }
    return JobSpec.from_dict({**common, **specs[case]})


@pytest.mark.parametrize("case", ["causal_lm", "causal_lm_top_k", "causal_lm_sequence", "text_classification"])
def test_resumed_run_equals_uninterrupted_run(files, tmp_path, case):
    spec = _spec(files, case)
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=3600)

    # Stop at the first optimizer step after epoch 1's record: mid-run, mid-epoch.
    out = tmp_path / "interrupted"
    state = interrupt_inside_epoch_two(spec, out)

    stages = []
    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True,
                               on_event=lambda kind, data: stages.append(data) if kind == "stage" else None)
    resumed_stage = [s for s in stages if s["stage"] == "resumed"]
    assert len(resumed_stage) == 1 and resumed_stage[0]["step"] == state["step"] > 0
    assert [stage["stage"] for stage in stages].count("generating") == 0  # the generated set is reused

    assert resumed.history == straight.history
    assert_same_tensors(straight.model_path / "model.safetensors", resumed.model_path / "model.safetensors")
