"""Shared fixtures for the engine tests: a small trained teacher and synthetic data files.

The problem: 4 standard-normal features, 3 classes, label = argmax(x @ W) for a fixed W
(linearly separable), so a small MLP teacher learns it to high accuracy in a few hundred
full-batch steps. The teacher is a "seed-style" module (fc1 -> relu -> fc2) exported with
distill.models.export_mlp, the way a user would bring one.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import distill.evaluate
from distill.models import export_mlp

NUM_FEATURES = 4
NUM_CLASSES = 3
N_TRAIN = 480  # not a multiple of the batch size used below, so the last batch is partial
N_VAL = 200


class SeedTeacher(nn.Module):
    """The shape of the seed project's teacher: fc1 -> relu -> fc2."""

    def __init__(self, input_dim: int = NUM_FEATURES, hidden: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def _true_weights() -> torch.Tensor:
    return torch.randn(NUM_FEATURES, NUM_CLASSES, generator=torch.Generator().manual_seed(1234))


def make_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, NUM_FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, (x @ _true_weights()).argmax(-1)


def write_csv(path: Path, features: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    header = [f"f{j}" for j in range(features.shape[1])] + (["label"] if labels is not None else [])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i, row in enumerate(features.tolist()):
            writer.writerow([repr(v) for v in row] + ([int(labels[i])] if labels is not None else []))
    return path


def write_jsonl(path: Path, features: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    with open(path, "w") as handle:
        for i, row in enumerate(features.tolist()):
            record = {"features": row}
            if labels is not None:
                record["label"] = int(labels[i])
            handle.write(json.dumps(record) + "\n")
    return path


@dataclass
class Workspace:
    root: Path
    teacher_path: Path
    teacher: nn.Module
    train_csv: Path  # unlabeled transfer set
    val_csv: Path  # labeled
    n_train: int
    n_val: int
    teacher_val_accuracy: float

    def spec_dict(self, **hyperparameters) -> dict:
        """A job spec (JSON form) whose file paths are relative to ``root``."""
        hp = {"epochs": 4, "batch_size": 64, "learning_rate": 2e-2, "temperature": 2.0, "seed": 7}
        hp.update(hyperparameters)
        return {
            "teacher": {"path": self.teacher_path.name},
            "training_file": self.train_csv.name,
            "validation_file": self.val_csv.name,
            "student": {"architecture": {"kind": "mlp", "hidden_dims": [8]}},
            "hyperparameters": hp,
        }


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """These models are tiny: one intra-op thread is as fast, and it keeps the run time stable when
    other processes load the CPU (two spinning OpenMP threads on a busy 2-core box can be 30x slower).
    Restored after each module so tests outside this folder see the usual setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("distill_ws")
    torch.manual_seed(0)
    teacher = SeedTeacher()
    x, y = make_problem(512, seed=1)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    teacher.eval()
    teacher_path = root / "teacher.safetensors"
    export_mlp(teacher, teacher_path)

    train_x, _ = make_problem(N_TRAIN, seed=2)
    val_x, val_y = make_problem(N_VAL, seed=3)
    with torch.no_grad():
        accuracy = (teacher(val_x).argmax(-1) == val_y).float().mean().item()
    assert accuracy > 0.9, f"the fixture teacher should learn the separable problem, got {accuracy}"
    return Workspace(
        root=root,
        teacher_path=teacher_path,
        teacher=teacher,
        train_csv=write_csv(root / "train.csv", train_x),
        val_csv=write_csv(root / "val.csv", val_x, val_y),
        n_train=N_TRAIN,
        n_val=N_VAL,
        teacher_val_accuracy=accuracy,
    )


@pytest.fixture
def fast_latency(monkeypatch):
    """Shrink evaluate's latency benchmark (>= 4 x 0.25 s per run) for tests that don't look at it."""
    monkeypatch.setattr(distill.evaluate, "measure_latency",
                        functools.partial(distill.evaluate.measure_latency, budget_s=0.0, max_iters=10))


@pytest.fixture(scope="session")
def problem():
    """The synthetic problem's helpers (test modules don't import conftest: that breaks under some import modes)."""
    from types import SimpleNamespace

    return SimpleNamespace(num_features=NUM_FEATURES, num_classes=NUM_CLASSES, make=make_problem,
                           write_csv=write_csv, write_jsonl=write_jsonl)
