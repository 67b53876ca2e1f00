"""Self-describing step checkpoints: ``checkpoints/step-000123/`` holding

- ``model.safetensors``: the student's state dict (shared/tied tensors stored once),
- ``optimizer.safetensors``: the optimizer's tensors, flattened to ``state.{param}.{name}``,
- ``rng.safetensors``: the torch RNG states (CPU, and each CUDA device) at that step,
- ``state.json``: data position (epoch, batch), step, the running epoch loss, the
  scheduler's state, metrics so far, the optimizer's scalar state and the spec.

Nothing here is pickled, so a checkpoint is as safe to read as a model file. A folder is
written under a temporary name and renamed, so a crash mid-write leaves no half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "CHECKPOINTS_DIR"]

CHECKPOINTS_DIR = "checkpoints"
PREFIX = "step-"


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entries in rest["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            states[f"cuda.{index}"] = torch.cuda.get_rng_state(index)
    return states


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    for key, value in states.items():
        if key.startswith("cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(key.split(".")[1]))


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-{step:06d}`` atomically; keep the newest ``keep``."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, rest = _split_optimizer_state(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in _rng_states().items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted(p for p in (Path(out_dir) / CHECKPOINTS_DIR).glob(f"{PREFIX}*") if (p / "state.json").exists())
    return folders[-1] if folders else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Restore the student, the optimizer and the RNG states in place; returns the saved state."""
    state = json.loads((folder / "state.json").read_text())
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state.pop("optimizer")))
    _restore_rng(load_file(str(folder / "rng.safetensors")))
    return state
