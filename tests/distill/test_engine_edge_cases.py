"""Regression tests for engine edge cases found while writing the unit tests: odd labels and
numbers in data files, large seeds, and gradients that must not reach the teacher."""

import json

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
