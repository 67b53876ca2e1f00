import copy
from pathlib import Path

import pytest

from distill.errors import SpecError
from distill.spec import Hyperparameters, JobSpec, MLPStudentArchitecture

MINIMAL = {
    "teacher": {"path": "teacher.safetensors"},
    "training_file": "train.csv",
    "student": {"architecture": {"kind": "mlp", "hidden_dims": [16]}},
}


def _spec(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def test_minimal_spec_fills_defaults(tmp_path):
    spec = JobSpec.from_dict(copy.deepcopy(MINIMAL), base_dir=tmp_path)
    assert spec.task == "classification"
    assert spec.validation_file is None
    assert spec.validation_split == 0.2
    assert spec.student.architecture == MLPStudentArchitecture(hidden_dims=[16], activation="relu")
    assert spec.hyperparameters == Hyperparameters(temperature=4.0)  # the classification default
    hp = spec.hyperparameters  # the documented defaults
    assert (hp.epochs, hp.temperature, hp.alpha, hp.lr_scheduler) == (20, 4.0, 0.5, "cosine")
    assert spec.metadata == {}


def test_kind_may_be_omitted_and_hyperparameters_are_read(tmp_path):
    data = _spec(student={"architecture": {"hidden_dims": [8, 4], "activation": "gelu"}},
                 hyperparameters={"epochs": 3, "alpha": 1, "temperature": 2.5, "lr_scheduler": "constant"},
                 validation_split=0.5, metadata={"run": "x"})
    spec = JobSpec.from_dict(data, base_dir=tmp_path)
    assert spec.student.architecture.hidden_dims == [8, 4] and spec.student.architecture.activation == "gelu"
    assert spec.hyperparameters.epochs == 3 and spec.hyperparameters.temperature == 2.5
    assert spec.hyperparameters.batch_size == Hyperparameters().batch_size  # untouched fields keep defaults
    assert spec.validation_split == 0.5 and spec.metadata == {"run": "x"}


def test_relative_paths_resolve_against_base_dir(tmp_path):
    spec = JobSpec.from_dict(_spec(validation_file={"path": "data/val.jsonl"}), base_dir=tmp_path)
    assert spec.teacher == tmp_path / "teacher.safetensors"
    assert spec.training_file == tmp_path / "train.csv"
    assert spec.validation_file == tmp_path / "data" / "val.jsonl"


def test_absolute_paths_are_kept(tmp_path):
    absolute = str(Path("/somewhere/else/train.csv").resolve())
    spec = JobSpec.from_dict(_spec(training_file=absolute), base_dir=tmp_path)
    assert spec.training_file == Path(absolute)


def test_to_dict_round_trips(tmp_path):
    spec = JobSpec.from_dict(_spec(validation_file="val.csv", hyperparameters={"epochs": 2}), base_dir=tmp_path)
    again = JobSpec.from_dict(spec.to_dict(), base_dir="/unused-because-paths-are-absolute")
    assert again == spec


@pytest.mark.parametrize("data,param", [
    (_spec(epoch=3), "epoch"),
    (_spec(hyperparameters={"epoch": 3}), "hyperparameters.epoch"),
    (_spec(hyperparameters={"epochs": 3, "lr": 0.1}), "hyperparameters.lr"),
    (_spec(student={"architecture": {"hidden_dims": [4], "depth": 2}}), "student.architecture.depth"),
    (_spec(teacher={"path": "t.safetensors", "model_id": "m"}), "teacher"),
])
def test_unknown_fields_rejected_with_param(tmp_path, data, param):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data, base_dir=tmp_path)
    assert info.value.param == param
    assert info.value.code == "invalid_spec"


@pytest.mark.parametrize("hyper,param", [
    ({"epochs": 0}, "hyperparameters.epochs"),
    ({"epochs": -1}, "hyperparameters.epochs"),
    ({"epochs": 2.0}, "hyperparameters.epochs"),
    ({"epochs": True}, "hyperparameters.epochs"),
    ({"epochs": "3"}, "hyperparameters.epochs"),
    ({"batch_size": 0}, "hyperparameters.batch_size"),
    ({"alpha": 1.5}, "hyperparameters.alpha"),
    ({"alpha": -0.1}, "hyperparameters.alpha"),
    ({"temperature": 0}, "hyperparameters.temperature"),
    ({"temperature": -1.0}, "hyperparameters.temperature"),
    ({"temperature": float("nan")}, "hyperparameters.temperature"),
    ({"learning_rate": 0}, "hyperparameters.learning_rate"),
    ({"learning_rate": float("inf")}, "hyperparameters.learning_rate"),
    ({"seed": -1}, "hyperparameters.seed"),
    ({"weight_decay": -0.01}, "hyperparameters.weight_decay"),
    ({"lr_scheduler": "linear"}, "hyperparameters.lr_scheduler"),
])
def test_out_of_range_hyperparameters(tmp_path, hyper, param):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(_spec(hyperparameters=hyper), base_dir=tmp_path)
    assert info.value.param == param


@pytest.mark.parametrize("architecture,param", [
    ({"hidden_dims": [8, -4]}, "student.architecture.hidden_dims[1]"),
    ({"hidden_dims": [0]}, "student.architecture.hidden_dims[0]"),
    ({"hidden_dims": [4.5]}, "student.architecture.hidden_dims[0]"),
    ({"hidden_dims": 8}, "student.architecture.hidden_dims"),
    ({"hidden_dims": [8], "activation": "swish"}, "student.architecture.activation"),
    ({"kind": "cnn", "hidden_dims": [8]}, "student.architecture.kind"),
    ({"kind": "mlp"}, "student.architecture.hidden_dims"),
])
def test_invalid_student(tmp_path, architecture, param):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(_spec(student={"architecture": architecture}), base_dir=tmp_path)
    assert info.value.param == param


@pytest.mark.parametrize("data,param", [
    ({k: v for k, v in MINIMAL.items() if k != "teacher"}, "teacher"),
    ({k: v for k, v in MINIMAL.items() if k != "training_file"}, "training_file"),
    ({k: v for k, v in MINIMAL.items() if k != "student"}, "student"),
    (_spec(student={"hidden_dims": [4]}), "student.hidden_dims"),
    (_spec(training_file=""), "training_file"),
    (_spec(training_file=3), "training_file"),
    (_spec(task="regression"), "task"),
    (_spec(validation_split=0), "validation_split"),
    (_spec(validation_split=0.95), "validation_split"),
    (_spec(hyperparameters=[1, 2]), "hyperparameters"),
])
def test_other_invalid_specs(tmp_path, data, param):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data, base_dir=tmp_path)
    assert info.value.param == param


def test_spec_must_be_an_object():
    with pytest.raises(SpecError):
        JobSpec.from_dict([MINIMAL])
