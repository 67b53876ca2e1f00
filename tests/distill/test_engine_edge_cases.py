"""Regression tests for engine edge cases found while writing the unit tests: odd labels and
numbers in data files, large seeds, and gradients that must not reach the teacher."""

import json

import distill.errors
import distill.recipes.causal_lm
import distill.train

import pytest
import torch

from distill.data import load_dataset
from distill.errors import DataError
from distill.losses import forward_kl
from distill.spec import JobSpec

# --- data: non-finite or huge labels are a DataError naming the line



@pytest.mark.parametrize("cell", ["nan", "inf", "-inf", "1e30"])
def test_csv_non_finite_or_huge_label_is_a_data_error(tmp_path, cell):
    path = tmp_path / "d.csv"
    path.write_text(f"a,label\n1,0\n2,{cell}\n")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 3


@pytest.mark.parametrize("label", ["NaN", "Infinity", "1e400", str(2**70)])
def test_jsonl_non_finite_or_huge_label_is_a_data_error(tmp_path, label):
    path = tmp_path / "d.jsonl"
    path.write_text('{"features": [1], "label": 0}\n{"features": [2], "label": %s}\n' % label)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2


# --- data: a JSON integer too large for a float is a DataError


def test_jsonl_huge_integer_feature_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"features": [1]}\n{"features": [1%s]}\n' % ("0" * 400))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2


# --- data: JSONL records split on "\n" only (U+2028 may sit inside a string)


def test_jsonl_with_unicode_line_separator_inside_a_string(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [{"features": [1.0], "note": "a\u2028b"}, {"features": [2.0], "note": "c"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert load_dataset(path).features.flatten().tolist() == [1.0, 2.0]


# --- train: every seed the spec accepts runs


def test_large_valid_seed_runs(workspace, tmp_path, fast_latency):
    spec = JobSpec.from_dict(workspace.spec_dict(epochs=1, seed=2**62), base_dir=workspace.root)
    result = distill.train.run_distillation(spec, tmp_path, device="cpu")
    assert len(result.history) == 1


# --- losses: no gradient reaches the teacher logits


def test_forward_kl_does_not_push_gradient_into_teacher_logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 4, generator=g, requires_grad=True)
    teacher = torch.randn(6, 4, generator=g, requires_grad=True)
    forward_kl(student, teacher, 2.0).backward()
    assert student.grad is not None
    assert teacher.grad is None or not teacher.grad.any()


# --- the one loop: batches with nothing to learn, contexts, CLI-free engine checks

from distill.errors import MismatchError  # noqa: E402
from distill.loop import train  # noqa: E402
from distill.recipes.base import Recipe, RunContext  # noqa: E402
from distill.spec import Hyperparameters  # noqa: E402
from distill.text_data import tokenize_for_lm  # noqa: E402
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir,  # noqa: E402
                                        synthetic_language, tiny_gpt2)


class _EveryOtherBatchEmpty(Recipe):
    """A recipe whose odd batches have no targets, to watch the loop skip them."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 1)
        self.num_examples = 8
        self.seen = []

    def batch_loss(self, indices):
        self.seen.append(len(self.seen))
        if len(self.seen) % 2 == 0:
            return None, 0
        return self.model(torch.ones(len(indices), 2)).pow(2).mean(), len(indices)

    def validate(self):
        return {"validation_loss": 0.0}


def test_loop_skips_batches_without_targets_and_counts_them(tmp_path):
    recipe = _EveryOtherBatchEmpty()
    ctx = RunContext(device=torch.device("cpu"), out_dir=tmp_path, on_event=lambda k, d: None,
                     should_stop=lambda: False)
    history = train(recipe, ctx, Hyperparameters(epochs=2, batch_size=2, temperature=1.0), 3600)
    assert [h["skipped_batches"] for h in history] == [2, 2]  # 4 batches an epoch, every second one empty
    assert all(h["train_loss"] is not None for h in history)
    assert [h["step"] for h in history] == [4, 8]


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-edges")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=24), tokenizer, root / "t")
    return root, tokenizer


def _lm_spec(root, training, **extra) -> JobSpec:
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_language(6, seed=9)))
    return JobSpec.from_dict({"task": "causal_lm", "teacher": str(root / "t"), "student": {"derive": {"num_layers": 1}},
                              "training_file": str(training), "validation_file": str(val),
                              "hyperparameters": {"epochs": 2, "batch_size": 1}, **extra})


def test_packed_row_of_one_token_is_skipped_not_a_crash(lm_files, tmp_path):
    root, tokenizer = lm_files
    max_length = 16
    for n in range(5, 80):  # find a document count whose packed stream ends in a one-token row
        texts = synthetic_language(n, seed=1)
        tokens = tokenize_for_lm("text", [{"text": t} for t in texts], tokenizer, max_length, packing=True)
        if int(tokens["attention_mask"][-1].sum()) == 1:
            break
    else:
        pytest.fail("no document count gives a one-token last row")
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = distill.train.run_distillation(_lm_spec(root, training, data={"max_length": max_length}),
                                            tmp_path / "out", device="cpu")
    assert [h["skipped_batches"] for h in result.history] == [1, 1]  # batch_size 1: that row is a batch
    assert all(h["train_loss"] > 0 for h in result.history)


def test_max_length_over_the_models_context_is_refused(lm_files, tmp_path):
    root, _ = lm_files
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_language(20, seed=2)))
    with pytest.raises(MismatchError) as info:
        distill.train.run_distillation(_lm_spec(root, training, data={"max_length": 64}), tmp_path / "o", device="cpu")
    assert info.value.param == "data.max_length" and "24" in info.value.message


def test_default_max_length_is_clamped_to_the_context(lm_files, tmp_path):
    root, _ = lm_files
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_language(40, seed=2)))
    spec = _lm_spec(root, training)
    assert spec.data.max_length is None  # not given: min(256, context) = 24 for this teacher
    seen = []
    real = distill.recipes.causal_lm.tokenize_for_lm

    def spy(kind, records, tokenizer, max_length, packing):
        seen.append(max_length)
        return real(kind, records, tokenizer, max_length, packing)

    distill.recipes.causal_lm.tokenize_for_lm = spy
    try:
        result = distill.train.run_distillation(spec, tmp_path / "out", device="cpu")
    finally:
        distill.recipes.causal_lm.tokenize_for_lm = real
    assert seen == [24, 24] and len(result.history) == 2


def test_a_top_k_signal_too_big_to_store_is_an_error_not_a_silent_switch(lm_files, tmp_path, monkeypatch):
    root, _ = lm_files
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_language(20, seed=2)))
    monkeypatch.setattr(distill.recipes.causal_lm, "TEACHER_SIGNAL_MAX_BYTES", 1024)
    stages = []
    with pytest.raises(MismatchError) as info:
        distill.train.run_distillation(_lm_spec(root, training, teacher_signal={"top_k": 8}), tmp_path / "o",
                                       device="cpu", on_event=lambda k, d: stages.append(d.get("stage")))
    assert info.value.param == "teacher_signal.top_k"
    assert "68 per token" in info.value.message and "1024" in info.value.message  # 8k + 4 bytes a token
    assert "training" not in stages and "teacher_inference" not in stages  # refused before the teacher ran


def test_generation_restores_the_tokenizers_sides_when_stopped(lm_files):
    from distill.hf import load_causal_lm, load_tokenizer
    from distill.recipes._text import generate_completions
    from distill.spec import GenerationSpec

    root, _ = lm_files
    model, tokenizer = load_causal_lm(root / "t"), load_tokenizer(root / "t")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    with pytest.raises(distill.errors.JobStopped):
        generate_completions(model, tokenizer, ["the cat", "a dog sees"], GenerationSpec(max_new_tokens=3),
                             torch.device("cpu"), should_stop=lambda: True)
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")
