"""The shared part of every recipe's resume test: stop a run inside epoch 2, then compare weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import latest_checkpoint
from distill.errors import JobStopped
from distill.spec import JobSpec
from distill.train import run_distillation


def interrupt_inside_epoch_two(spec: JobSpec, out: Path) -> dict:
    """Run ``spec`` into ``out`` and stop it at the first optimizer step after epoch 1's record (mid-run,
    mid-epoch); returns the state of the step checkpoint the stop wrote."""
    records: list[dict] = []
    with pytest.raises(JobStopped):
        run_distillation(spec, out, device="cpu", checkpoint_interval_s=3600,
                         on_event=lambda kind, data: records.append(data) if kind == "epoch" else None,
                         should_stop=lambda: len(records) >= 1)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name.startswith("step-")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["epoch"] == 1 and state["batch"] > 0  # inside epoch 2, not at its start
    return state


def assert_same_tensors(expected_file: Path, got_file: Path) -> None:
    """Two safetensors files hold the same tensor names with bit-identical values."""
    expected, got = load_file(str(expected_file)), load_file(str(got_file))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
