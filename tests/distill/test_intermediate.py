"""Intermediate-layer distillation (spec.intermediate): the losses against their formulas
(value and gradient, with masks), the layer map, the projections (only where widths differ),
the attention switch to eager, the head-count check, and — through whole runs — that the
projections train and checkpoint with the student (resume is bit-identical) but never reach
the exported model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distill.checkpoint import CHECKPOINTS_DIR
from distill.errors import MismatchError
from distill.hf import student_from_config
from distill.losses.intermediate import (attention_kl, hidden_cosine, hidden_mse, masked_mean, resolve_layer_pairs,
                                         uniform_layer_pairs)
from distill.recipes._intermediate import Intermediate
from distill.spec import IntermediateSpec, JobSpec
from distill.train import run_distillation
from tests.distill.resume_helpers import assert_same_tensors, interrupt_inside_epoch_two
from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language,
                                        tiny_bert_classifier, tiny_gpt2)

EPOCHS = 3


# ---- the losses against their formulas ----------------------------------------------------------------------

def _states(seed: int, shape=(2, 5, 3)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*shape, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # row 1 is padded after 3 tokens
    return student, teacher, mask


def _direct(student, teacher, mask, per_position) -> torch.Tensor:
    terms = [per_position(student[b, i], teacher[b, i]) for b in range(mask.shape[0]) for i in range(mask.shape[1])
             if mask[b, i]]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("loss, formula", [
    (hidden_cosine, lambda s, t: 1 - (s * t).sum() / (s.norm() * t.norm())),
    (hidden_mse, lambda s, t: ((s - t) ** 2).sum() / s.shape[0]),
])
def test_hidden_losses_match_the_formula_in_value_and_gradient(loss, formula):
    student, teacher, mask = _states(0)
    ours = masked_mean(loss(student, teacher, mask))
    (grad_ours,) = torch.autograd.grad(ours, student)
    direct = _direct(student, teacher, mask, formula)
    (grad_direct,) = torch.autograd.grad(direct, student)
    assert torch.allclose(ours.double(), direct, atol=1e-6)
    assert torch.allclose(grad_ours, grad_direct, atol=1e-6)
    assert torch.all(grad_ours[1, 3:] == 0)  # padding positions get no gradient
    # The padded positions don't move the value, whatever they hold.
    moved = student.detach().clone()
    moved[1, 3:] += 100
    assert torch.allclose(masked_mean(loss(moved, teacher, mask)).double(), direct, atol=1e-6)


def test_hidden_losses_are_zero_for_equal_states_and_an_empty_mask_backwards():
    student, _, mask = _states(1)
    assert masked_mean(hidden_mse(student, student.detach(), mask)).item() == 0
    assert abs(masked_mean(hidden_cosine(student, 3 * student.detach(), mask)).item()) < 1e-12  # scale-free
    empty = masked_mean(hidden_cosine(student, student.detach() + 1, torch.zeros_like(mask)))
    empty.backward()
    assert empty.item() == 0 and torch.all(student.grad == 0)


def _attention(seed: int, batch=2, heads=3, length=5, causal=True) -> torch.Tensor:
    scores = torch.randn(batch, heads, length, length, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    return scores


def test_attention_kl_matches_the_formula_with_masked_keys_and_dropped_entries():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    key_block = (mask == 0)[:, None, None, :]
    student_scores = _attention(0).masked_fill(key_block, -math.inf).requires_grad_(True)
    teacher = torch.softmax(_attention(1).masked_fill(key_block, -math.inf), -1)
    student = torch.softmax(student_scores, -1)
    # Attention dropout while training zeroes entries (and rescales the rest): one such entry.
    keep = torch.ones_like(student)
    keep[0, 1, 4, 2] = 0
    student = student * keep

    ours = masked_mean(attention_kl(student, teacher, mask))
    (grad_ours,) = torch.autograd.grad(ours, student_scores)

    def direct_kl(s: torch.Tensor) -> torch.Tensor:
        rows = []
        for b in range(2):
            for q in range(5):
                if not mask[b, q]:
                    continue
                per_head = []
                for h in range(3):
                    total = s.new_zeros(())
                    for k in range(5):
                        t_value, s_value = teacher[b, h, q, k], s[b, h, q, k]
                        if mask[b, k] and t_value > 0 and s_value > 0:
                            total = total + t_value * (torch.log(t_value) - torch.log(s_value))
                    per_head.append(total)
                rows.append(sum(per_head) / 3)
        return sum(rows) / len(rows)

    direct = direct_kl(torch.softmax(student_scores, -1) * keep)
    (grad_direct,) = torch.autograd.grad(direct, student_scores)
    assert torch.allclose(ours, direct, atol=1e-9) and ours.item() > 0
    assert torch.isfinite(grad_ours).all() and torch.allclose(grad_ours, grad_direct, atol=1e-9)
    # Equal distributions: zero.
    assert abs(masked_mean(attention_kl(teacher, teacher, mask)).item()) < 1e-12


# ---- the layer map --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("student_layers, teacher_layers, expected", [
    (2, 4, [(0, 1), (1, 3)]),
    (3, 12, [(0, 3), (1, 7), (2, 11)]),
    (4, 6, [(0, 1), (1, 2), (2, 4), (3, 5)]),  # 1.5 and 4.5 round up
    (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
    (4, 2, [(0, 0), (1, 0), (2, 1), (3, 1)]),  # a student deeper than its teacher
    (3, 1, [(0, 0), (1, 0), (2, 0)]),
    (1, 6, [(0, 5)]),
])
def test_uniform_layer_pairs(student_layers, teacher_layers, expected):
    assert uniform_layer_pairs(student_layers, teacher_layers) == expected


def test_explicit_pairs_are_checked_against_both_depths():
    assert resolve_layer_pairs([[0, 3], [1, 1]], 2, 4) == [(0, 3), (1, 1)]
    with pytest.raises(MismatchError) as student_side:
        resolve_layer_pairs([[0, 1], [2, 1]], 2, 4)
    assert student_side.value.param == "intermediate.layers[1][0]" and "2 layers" in student_side.value.message
    with pytest.raises(MismatchError) as teacher_side:
        resolve_layer_pairs([[0, 4]], 2, 4)
    assert teacher_side.value.param == "intermediate.layers[0][1]" and "4 layers" in teacher_side.value.message


# ---- the model side: projections, eager attention, head counts ------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(SYNTHETIC_WORDS)


def _probe(tokenizer):
    encoded = tokenizer(["the cat sees a dog .", "some dogs like"], return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _intermediate(tokenizer, student, teacher, base=True, **options) -> Intermediate:
    ids, mask = _probe(tokenizer)
    return Intermediate(IntermediateSpec(**options), student, teacher, ids, mask, base, base, torch.device("cpu"))


def test_projections_only_where_widths_differ(tokenizer):
    teacher = tiny_gpt2(tokenizer, n_layer=4, n_embd=32, n_head=2)
    narrow = tiny_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2, seed=1)
    match = _intermediate(tokenizer, narrow, teacher)
    assert match.pairs == [(0, 1), (1, 3)]
    assert sorted(match.module.projections) == ["0", "1"]
    assert match.module.projections["0"].weight.shape == (32, 16)  # student 16 → teacher 32
    assert match.describe()["projections"] is True

    same = _intermediate(tokenizer, tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=1), teacher,
                         layers=[[1, 3]])
    assert same.pairs == [(1, 3)] and len(same.module.projections) == 0
    assert list(same.module.parameters()) == [] and same.describe()["projections"] is False

    # The term: hidden_states[j + 1] is block j's output, projected, against the teacher's block.
    ids, mask = _probe(tokenizer)
    student, teacher_features = match.student_features(ids, mask), match.teacher_features(ids, mask)
    assert len(student.hidden) == 3 and len(teacher_features.hidden) == 5
    hidden, kl = match.terms(student, teacher_features, mask)
    expected = torch.stack([hidden_cosine(match.module.projections[str(i)](student.hidden[s + 1]),
                                          teacher_features.hidden[t + 1], mask)
                            for i, (s, t) in enumerate(match.pairs)]).mean(0)
    assert kl is None and hidden.shape == (int(mask.sum()),) and torch.allclose(hidden, expected)
    assert torch.allclose(match.loss(student, teacher_features, mask), masked_mean(hidden))  # weight 1
    # Projections and student both get gradients from the term; the teacher none.
    match.loss(student, teacher_features, mask).backward()
    assert match.module.projections["0"].weight.grad.abs().sum() > 0
    assert narrow.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_attention_switches_to_eager_and_back(tokenizer, family):
    if family == "gpt2":
        teacher, student = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), \
            tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=1)
    else:
        teacher = tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2, hidden_size=32,
                                       num_attention_heads=2)
        student = tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=1, hidden_size=16,
                                       num_attention_heads=2, intermediate_size=32, seed=1)
    before = student.config._attn_implementation
    assert before != "eager"  # sdpa: returns no probabilities
    match = _intermediate(tokenizer, student, teacher, base=family == "gpt2", attention=True)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    ids, mask = _probe(tokenizer)
    features = match.student_features(ids, mask)
    assert features.attention.shape == (2, 2, ids.shape[1], ids.shape[1])
    real = mask.bool()
    assert torch.allclose(features.attention.sum(-1)[real[:, None, :].expand(-1, 2, -1)], torch.tensor(1.0))
    assert features.attention[1, :, :, ~real[1]].abs().max() < 1e-6  # padded keys get no attention
    hidden, kl = match.terms(features, match.teacher_features(ids, mask), mask)
    assert kl.shape == hidden.shape and (kl >= 0).all() and kl.sum() > 0
    assert match.describe()["attention_heads"] == 2
    match.restore_attention()
    assert student.config._attn_implementation == teacher.config._attn_implementation == before


def test_attention_needs_equal_head_counts(tokenizer):
    teacher = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=4)
    student = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=1)
    with pytest.raises(MismatchError) as caught:
        _intermediate(tokenizer, student, teacher, attention=True)
    assert caught.value.param == "intermediate.attention"
    assert "2 heads" in caught.value.message and "4" in caught.value.message
    assert len(_intermediate(tokenizer, student, teacher).pairs) == 1  # without attention it's fine


# ---- whole runs: trained, checkpointed, resumed, not exported --------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("intermediate")
    save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64), tokenizer, root / "lm")
    save_model_dir(tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64), tokenizer, root / "bert")
    other = make_word_tokenizer(["completely", "different", "words", "."])
    save_model_dir(tiny_bert_classifier(other, num_labels=2, num_hidden_layers=1, hidden_size=16,
                                        num_attention_heads=2, intermediate_size=32), other, root / "other_bert")
    sentences = synthetic_language(48, seed=3)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (root / "labels.jsonl").write_text("".join(
        json.dumps({"text": s, "label": int(" and " in s)}) + "\n" for s in sentences))
    return root


def _spec(files, case: str, **changes) -> JobSpec:
    hp = {"epochs": EPOCHS, "batch_size": 4, "learning_rate": 3e-3}
    common = {"validation_split": 0.25, "hyperparameters": hp, "data": {"max_length": 16}}
    specs = {
        # narrower student (projection), dropout (the RNG state matters), cosine on the uniform map
        "causal_lm": {"task": "causal_lm", "teacher": str(files / "lm"), "training_file": str(files / "text.jsonl"),
                      "student": {"architecture": {"kind": "hf", "config": {
                          "n_layer": 1, "n_embd": 16, "resid_pdrop": 0.1, "embd_pdrop": 0.1}}},
                      "intermediate": {"type": "cosine"}},
        # narrower student, same head count: MSE through a projection + the attention KL
        "text_classification": {"task": "text_classification", "teacher": str(files / "bert"),
                                "training_file": str(files / "labels.jsonl"),
                                "student": {"architecture": {"kind": "hf", "config": {
                                    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
                                    "hidden_dropout_prob": 0.1}}},
                                "intermediate": {"type": "mse", "attention": True, "weight": 0.5}},
    }
    return JobSpec.from_dict({**common, **specs[case], **changes})


@pytest.mark.parametrize("case", ["causal_lm", "text_classification"])
def test_projection_trains_checkpoints_and_resumes_bit_identically(files, tmp_path, case):
    spec = _spec(files, case)
    # A checkpoint after every step (but the last): the two newest are kept.
    straight = run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=0)
    kept = sorted((tmp_path / "straight" / CHECKPOINTS_DIR).glob("step-*"))
    assert len(kept) == 2
    older, newer = (load_file(str(folder / "model.safetensors")) for folder in kept)
    projection = "intermediate.projections.0.weight"
    assert projection in newer and not torch.equal(older[projection], newer[projection])  # it trains
    assert any(name.startswith("student.") for name in newer)

    out = tmp_path / "interrupted"
    interrupt_inside_epoch_two(spec, out)
    resumed = run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600, resume=True)

    assert resumed.history == straight.history
    assert_same_tensors(straight.model_path / "model.safetensors", resumed.model_path / "model.safetensors")

    # The intermediate term is reported per epoch and described in the evaluation.
    assert all(record["validation_intermediate_loss"] >= 0 for record in straight.history)
    report = straight.evaluation["intermediate"]
    assert report["projections"] is True and report["pairs"] == [[0, 1]]
    if case == "text_classification":
        assert all(record["validation_attention_kl"] >= 0 for record in straight.history)
        assert report["attention"] is True and report["attention_heads"] == 2

    # The export is the student alone: no projection tensors, and it loads with nothing unexpected.
    exported = load_file(str(straight.model_path / "model.safetensors"))
    assert not any("projection" in name or name.startswith(("intermediate.", "student.")) for name in exported)
    auto = AutoModelForCausalLM if case == "causal_lm" else AutoModelForSequenceClassification
    _, loading = auto.from_pretrained(straight.model_path, output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["missing_keys"]
    assert json.loads((straight.model_path / "config.json").read_text()).get("_attn_implementation") is None


def test_weight_zero_leaves_the_output_level_training_unchanged(files, tmp_path):
    """Same widths, no attention, weight 0: the one-forward path with hidden states trains the
    student exactly as the plain recipe does (the output-level loss is untouched)."""
    student = {"architecture": {"kind": "hf", "config": {"n_layer": 1}}}
    hp = {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3}
    plain = run_distillation(_spec(files, "causal_lm", student=student, intermediate=None, hyperparameters=hp),
                             tmp_path / "plain", device="cpu")
    zero = run_distillation(_spec(files, "causal_lm", student=student, hyperparameters=hp,
                                  intermediate={"weight": 0.0}), tmp_path / "zero", device="cpu")
    assert zero.evaluation["intermediate"]["projections"] is False
    assert zero.history[0]["train_loss"] == plain.history[0]["train_loss"]
    expected, got = (load_file(str(r.model_path / "model.safetensors")) for r in (plain, zero))
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_engine_refusals_name_the_field(files, tmp_path):
    with pytest.raises(MismatchError) as depth:
        run_distillation(_spec(files, "causal_lm", intermediate={"layers": [[0, 1], [1, 1]]}), tmp_path / "a",
                         device="cpu")
    assert depth.value.param == "intermediate.layers[1][0]"
    heads = _spec(files, "causal_lm", intermediate={"attention": True},
                  student={"architecture": {"kind": "hf", "config": {"n_layer": 1, "n_head": 4}}})
    with pytest.raises(MismatchError) as attention:
        run_distillation(heads, tmp_path / "b", device="cpu")
    assert attention.value.param == "intermediate.attention"
    other_tokenizer = _spec(files, "text_classification", student={"path": str(files / "other_bert")})
    with pytest.raises(MismatchError) as tokenizer:
        run_distillation(other_tokenizer, tmp_path / "c", device="cpu")
    assert tokenizer.value.param == "intermediate" and "tokenizer" in tokenizer.value.message


def test_a_derived_student_config_keeps_the_teachers_heads(tokenizer):
    """What the submit-time check assumes for architecture students: heads follow the override or the teacher."""
    teacher = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=4)
    assert student_from_config(teacher.config, {"n_layer": 1}, "causal_lm").config.num_attention_heads == 4
    assert student_from_config(teacher.config, {"n_head": 2}, "causal_lm").config.num_attention_heads == 2
