"""Self-describing checkpoints: ``checkpoints/epoch-000012/`` holding

- ``model.safetensors``: the student in the model file format (loadable on its own),
- ``optimizer.safetensors``: the optimizer's tensors, flattened to ``state.{param}.{name}``,
- ``state.json``: epoch, step, metrics so far, the optimizer's scalar state and the spec.

Nothing here is pickled, so a checkpoint is as safe to read as a model file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import MLP, load_model, save_model

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "CHECKPOINTS_DIR"]

CHECKPOINTS_DIR = "checkpoints"


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


def save_checkpoint(out_dir: Path, student: MLP, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/epoch-{epoch:06d}`` atomically (temp folder, then rename); keep the newest ``keep``."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    final = root / f"epoch-{state['epoch']:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(student, tmp / "model.safetensors")
    tensors, rest = _split_optimizer_state(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": rest}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted(p for p in (Path(out_dir) / CHECKPOINTS_DIR).glob("epoch-*") if (p / "state.json").exists())
    return folders[-1] if folders else None


def load_checkpoint(folder: Path, student: MLP, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Restore student weights and optimizer state in place; returns the saved state."""
    state = json.loads((folder / "state.json").read_text())
    student.load_state_dict(load_model(folder / "model.safetensors", device).state_dict())
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state.pop("optimizer")))
    return state
