"""End-to-end engine runs on the tiny synthetic problem from conftest.py (CPU, a second or two each)."""

import json

import pytest
import torch

import distill.evaluate
import distill.kinds.mlp
import distill.train
from distill.checkpoint import latest_checkpoint
from distill.errors import JobStopped, MismatchError
from distill.models import load_model, read_architecture
from distill.spec import JobSpec

NUM_FEATURES, NUM_CLASSES = 4, 3  # the synthetic problem in conftest.py
MAIN_EPOCHS = 10
STEPS_PER_EPOCH = 8  # ceil(480 training rows / batch 64)


def _spec(workspace, **changes) -> JobSpec:
    data = workspace.spec_dict(**changes.pop("hyperparameters", {}))
    data.update(changes)
    return JobSpec.from_dict(data, base_dir=workspace.root)


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def __call__(self, kind, data):
        self.events.append((kind, dict(data)))

    def stages(self):
        return [d["stage"] for k, d in self.events if k == "stage"]

    def of(self, kind):
        return [d for k, d in self.events if k == kind]


@pytest.fixture(scope="module")
def main_run(workspace, tmp_path_factory):
    """One full run with the real latency benchmark, shared by the checks below."""
    out = tmp_path_factory.mktemp("main_run")
    recorder = Recorder()
    spec = _spec(workspace, hyperparameters={"epochs": MAIN_EPOCHS})
    result = distill.train.run_distillation(spec, out, on_event=recorder, device="cpu")
    return result, recorder, out


def test_result_file_loads_and_matches_student_architecture(main_run, workspace, problem):
    result, _, out = main_run
    assert result.model_path == out / "final" / "model.safetensors"
    model = load_model(result.model_path)
    arch = read_architecture(result.model_path)
    assert (arch.input_dim, arch.hidden_dims, arch.num_classes) == (NUM_FEATURES, [8], NUM_CLASSES)
    assert result.architecture == arch.to_dict() and result.parameters == arch.num_parameters
    x, _ = problem.make(5, seed=99)
    with torch.no_grad():
        assert model(x).shape == (5, NUM_CLASSES)
    state = json.loads((out / "final" / "distill_state.json").read_text())
    assert len(state["history"]) == MAIN_EPOCHS and state["history"][-1]["epoch"] == MAIN_EPOCHS
    assert str(workspace.root) not in json.dumps(state)  # files by name, no server paths
    assert result.device == "cpu"


def test_evaluation_report(main_run, workspace):
    result, recorder, _ = main_run
    report = result.evaluation
    assert recorder.of("evaluation") == [report]
    assert report["validation_rows"] == workspace.n_val
    assert report["teacher"]["accuracy"] == pytest.approx(workspace.teacher_val_accuracy)
    assert 0.0 <= report["student"]["accuracy"] <= 1.0
    assert 0.0 <= report["agreement"] <= 1.0
    # parameters: teacher 4*32+32 + 32*3+3, student 4*8+8 + 8*3+3
    assert report["teacher"]["parameters"] == 4 * 32 + 32 + 32 * 3 + 3
    assert report["student"]["parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert report["parameter_ratio"] == pytest.approx(report["student"]["parameters"] / report["teacher"]["parameters"])
    for who in ("teacher", "student"):
        assert report[who]["latency_ms_per_sample"] > 0
        assert report[who]["throughput_samples_per_s"] > 0
    assert report["speedup"] > 0
    assert report["kl_teacher_student"] >= 0


def test_student_agrees_with_teacher(main_run):
    result, _, _ = main_run
    # 3 classes: chance agreement is about 1/3
    assert result.evaluation["agreement"] > 0.8
    assert result.evaluation["student"]["accuracy"] > 0.75


def test_events_stages_in_order_and_one_epoch_event_per_epoch(main_run):
    result, recorder, _ = main_run
    stages = recorder.stages()
    assert stages == ["loading", "teacher_inference", "training", "evaluating", "exporting"]
    epochs = recorder.of("epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, MAIN_EPOCHS + 1))
    assert epochs == result.history
    kinds = [k for k, _ in recorder.events]
    # every epoch event falls between the 'training' and 'evaluating' stage events
    training_at = recorder.events.index(("stage", {"stage": "training", "epochs": MAIN_EPOCHS,
                                                  "total_steps": MAIN_EPOCHS * STEPS_PER_EPOCH,
                                                  "steps_per_epoch": STEPS_PER_EPOCH}))
    evaluating_at = kinds.index("stage", training_at + 1)
    assert all(training_at < i < evaluating_at for i, (k, _) in enumerate(recorder.events) if k == "epoch")
    for e in epochs:
        assert e["step"] == STEPS_PER_EPOCH * e["epoch"]
        for key in ("train_loss", "learning_rate", "validation_loss", "validation_agreement", "validation_accuracy",
                    "skipped_batches"):
            assert key in e
    # the loss went down over the run
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_teacher_runs_once_per_row_for_the_whole_job(workspace, tmp_path, monkeypatch):
    """Count the rows that pass through the loaded teacher's forward, per stage."""
    recorder = Recorder()
    teachers = []
    real_load_model = distill.kinds.mlp.load_model

    def load_model_and_hook(path, device="cpu"):
        model = real_load_model(path, device)
        if path == spec.teacher:
            teachers.append(model)
            model.register_forward_hook(lambda module, args, output: rows.append((recorder.stages()[-1], args[0].shape[0])))
        return model

    rows: list[tuple[str, int]] = []
    spec = _spec(workspace, hyperparameters={"epochs": 3})
    monkeypatch.setattr(distill.kinds.mlp, "load_model", load_model_and_hook)
    # The evaluation's latency benchmark times extra teacher forwards on the validation rows; that is a
    # benchmark, not inference, so stub it here to count only the forwards that produce logits.
    monkeypatch.setattr(distill.evaluate, "measure_latency", lambda *args, **kwargs: 1.0)
    distill.train.run_distillation(spec, tmp_path, on_event=recorder, device="cpu")

    assert len(teachers) == 1
    assert sum(n for _, n in rows) == workspace.n_train + workspace.n_val
    assert {stage for stage, _ in rows} == {"teacher_inference"}
    assert len(recorder.of("epoch")) == 3


def test_should_stop_raises_job_stopped(workspace, tmp_path):
    calls = []

    def stop():
        calls.append(1)
        return True

    with pytest.raises(JobStopped) as info:
        distill.train.run_distillation(_spec(workspace), tmp_path, should_stop=stop, device="cpu")
    assert info.value.code == "cancelled"
    assert len(calls) == 1  # polled after the first step, and the run stopped there
    assert not (tmp_path / "final").exists()


def test_feature_count_mismatch(workspace, tmp_path, problem):
    x, _ = problem.make(20, seed=5)
    problem.write_csv(tmp_path / "wide.csv", torch.cat([x, x[:, :1]], dim=1))  # 5 features, teacher takes 4
    spec = _spec(workspace, training_file=str(tmp_path / "wide.csv"))
    with pytest.raises(MismatchError) as info:
        distill.train.run_distillation(spec, tmp_path / "out", device="cpu")
    assert info.value.param == "training_file"
    assert "5" in info.value.message and "4" in info.value.message


def test_validation_label_out_of_range(workspace, tmp_path, problem):
    x, y = problem.make(20, seed=6)
    y[7] = NUM_CLASSES  # labels must be 0..NUM_CLASSES-1
    problem.write_csv(tmp_path / "val.csv", x, y)
    spec = _spec(workspace, validation_file=str(tmp_path / "val.csv"))
    with pytest.raises(MismatchError) as info:
        distill.train.run_distillation(spec, tmp_path / "out", device="cpu")
    assert info.value.param == "validation_file"


def test_labeled_training_file_without_validation_file(workspace, tmp_path, problem, fast_latency):
    """The other data path: labels in the transfer set (alpha mixes in CE) and a held-out split."""
    x, y = problem.make(100, seed=8)
    problem.write_csv(tmp_path / "train_labeled.csv", x, y)
    data = workspace.spec_dict(epochs=2, alpha=0.5)
    data["training_file"] = str(tmp_path / "train_labeled.csv")
    del data["validation_file"]
    data["validation_split"] = 0.25
    result = distill.train.run_distillation(JobSpec.from_dict(data, base_dir=workspace.root), tmp_path / "out",
                                            device="cpu")
    assert result.evaluation["validation_rows"] == 25
    assert result.evaluation["student"]["accuracy"] is not None
    assert len(result.history) == 2


def test_resume_continues_and_matches_uninterrupted_run(workspace, tmp_path, fast_latency):
    spec = _spec(workspace, hyperparameters={"epochs": 4})
    stop_after = 2 * STEPS_PER_EPOCH + 1  # mid-epoch 3: resume must continue at the next batch, not the next epoch

    # 1. interrupted: should_stop is polled once per optimizer step; stopping writes a checkpoint first
    interrupted = tmp_path / "interrupted"
    recorder = Recorder()
    # the first poll after epoch 2's record comes after the first step of epoch 3
    with pytest.raises(JobStopped):
        distill.train.run_distillation(spec, interrupted, on_event=recorder, device="cpu", checkpoint_interval_s=3600,
                                       should_stop=lambda: len(recorder.of("epoch")) >= 2)
    assert [e["epoch"] for e in recorder.of("epoch")] == [1, 2]
    assert latest_checkpoint(interrupted).name == f"step-{stop_after:06d}"

    # 2. resumed
    resumed_events = Recorder()
    resumed = distill.train.run_distillation(spec, interrupted, on_event=resumed_events, device="cpu",
                                             checkpoint_interval_s=0, resume=True)
    resumed_stage = [d for d in resumed_events.of("stage") if d["stage"] == "resumed"]
    assert len(resumed_stage) == 1 and resumed_stage[0]["epoch"] == 3 and resumed_stage[0]["step"] == stop_after
    assert resumed_events.stages().index("resumed") < resumed_events.stages().index("training")
    assert [e["epoch"] for e in resumed_events.of("epoch")] == [3, 4]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]

    # 3. uninterrupted, same seed: identical on CPU, bit for bit
    straight = distill.train.run_distillation(spec, tmp_path / "straight", device="cpu", checkpoint_interval_s=0)

    resumed_state = load_model(resumed.model_path).state_dict()
    straight_state = load_model(straight.model_path).state_dict()
    assert resumed_state.keys() == straight_state.keys()
    for name in straight_state:
        assert torch.equal(resumed_state[name], straight_state[name]), name
    assert resumed.history == straight.history


def test_resume_without_checkpoint_starts_fresh(workspace, tmp_path, fast_latency):
    recorder = Recorder()
    distill.train.run_distillation(_spec(workspace, hyperparameters={"epochs": 1}), tmp_path, on_event=recorder,
                                   device="cpu", resume=True)
    assert "resumed" not in recorder.stages()
    assert len(recorder.of("epoch")) == 1
