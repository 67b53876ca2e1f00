"""The full-vocabulary teacher signal in the teacher-signal store (teacher_signal.full_logits): a first job
runs the teacher once and trains from the stored float16 logits, a repeat job hits and trains bit-identically
without the teacher; "online" runs the teacher every batch; too big for the budget falls back to online."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.recipes import causal_lm
from distill.spec import JobSpec
from distill.teacher_cache import TeacherCache
from distill.train import run_distillation
from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language, \
    tiny_gpt2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    return save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer,
                          tmp_path_factory.mktemp("teacher") / "t")


def _spec(tmp_path, teacher_dir, full_logits="auto", epochs=2) -> JobSpec:
    texts = [" ".join(synthetic_language(4, seed=i)) for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return JobSpec.from_dict({
        "task": "causal_lm", "teacher": {"path": str(teacher_dir)}, "student": {"derive": {"num_layers": 1}},
        "training_file": str(data), "validation_split": 0.25, "data": {"max_length": 32},
        "teacher_signal": {"full_logits": full_logits},
        "hyperparameters": {"epochs": epochs, "batch_size": 8, "temperature": 2.0, "alpha": 0.5}})


def _run(spec, out, cache, monkeypatch):
    """(result, teacher_signal events, teacher body calls during training)."""
    events, calls = [], {"body": 0}
    real = causal_lm.CausalLMToken.batch_loss

    def counting(self, indices):
        body = self.teacher.body

        def counted(*args, **kwargs):
            calls["body"] += 1
            return body(*args, **kwargs)

        self.teacher.body = counted
        try:
            return real(self, indices)
        finally:
            self.teacher.body = body

    monkeypatch.setattr(causal_lm.CausalLMToken, "batch_loss", counting)
    result = run_distillation(spec, out, on_event=lambda kind, data: events.append((kind, data)), device="cpu",
                              teacher_cache=cache)
    return result, [data for kind, data in events if kind == "teacher_signal"], calls["body"]


def _weights(result):
    return load_file(str(result.model_path / "model.safetensors"))


def test_first_job_stores_the_logits_and_a_repeat_job_trains_identically_without_the_teacher(
        tmp_path, teacher_dir, monkeypatch):
    cache = TeacherCache(tmp_path / "work", 1 << 30)
    spec = _spec(tmp_path, teacher_dir)
    first, events1, body1 = _run(spec, tmp_path / "job1", cache, monkeypatch)
    second, events2, body2 = _run(spec, tmp_path / "job2", cache, monkeypatch)
    assert [e["cache"] for e in events1] == ["miss"] and [e["cache"] for e in events2] == ["hit"]
    assert body1 == body2 == 0  # training never ran the teacher: both read the stored logits
    event = events1[0]
    assert event["full_vocabulary"] and event["bytes_per_token"] == 2 * event["vocabulary"]
    assert event["cache_bytes"] >= event["positions"] * event["vocabulary"] * 2
    assert events2[0]["cache_key"] == event["cache_key"]
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert first.history == second.history


def test_online_runs_the_teacher_every_batch_and_trains_close_to_the_stored_logits(tmp_path, teacher_dir,
                                                                                    monkeypatch):
    cache = TeacherCache(tmp_path / "work", 1 << 30)
    cached, _, _ = _run(_spec(tmp_path, teacher_dir), tmp_path / "cached", cache, monkeypatch)
    online, events, body = _run(_spec(tmp_path, teacher_dir, "online"), tmp_path / "online", cache, monkeypatch)
    assert events == [] and body > 0
    # float16 teacher logits change the loss in its 3rd-4th digit, not the training
    for c, o in zip(cached.history, online.history):
        assert c["train_loss"] == pytest.approx(o["train_loss"], rel=1e-2)
        assert c["validation_loss"] == pytest.approx(o["validation_loss"], rel=1e-2)


def test_bigger_than_the_budget_trains_online(tmp_path, teacher_dir, monkeypatch):
    cache = TeacherCache(tmp_path / "work", 10_000)  # far below N·L·V·2 bytes
    result, events, body = _run(_spec(tmp_path, teacher_dir, "cache", epochs=1), tmp_path / "small", cache,
                                monkeypatch)
    assert [e["cache"] for e in events] == ["too_big"] and body > 0
    assert result.history and not list((tmp_path / "work").rglob("*.f16*"))
