"""Small, real inputs the tests build themselves: a trained teacher MLP and its data files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.models import export_mlp


def clusters(rows: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: separable enough that a teacher learns them, noisy enough to be soft."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 2.0
    labels = torch.randint(0, classes, (rows,), generator=generator)
    return centers[labels] + torch.randn(rows, features, generator=generator), labels


def train_teacher(x: torch.Tensor, y: torch.Tensor, hidden: list[int], classes: int, steps: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [x.shape[1], *hidden]
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_csv(path: Path, x: torch.Tensor, y: torch.Tensor | None) -> Path:
    header = [f"x{i}" for i in range(x.shape[1])] + (["label"] if y is not None else [])
    lines = [",".join(header)]
    for i, row in enumerate(x.tolist()):
        cells = [f"{v:.5f}" for v in row] + ([str(int(y[i]))] if y is not None else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Problem:
    teacher: Path
    train_csv: Path  # unlabeled transfer set
    val_csv: Path  # labeled
    features: int
    classes: int
    val_x: torch.Tensor
    val_y: torch.Tensor


def make_problem(folder: Path, features: int = 8, classes: int = 3, rows: int = 600, hidden=(64, 64)) -> Problem:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = clusters(rows, features, classes, seed=1)
    val_x, val_y = clusters(rows // 4, features, classes, seed=2)
    teacher = train_teacher(x, y, list(hidden), classes)
    export_mlp(teacher, folder / "teacher.safetensors")
    return Problem(teacher=folder / "teacher.safetensors", train_csv=write_csv(folder / "train.csv", x, None),
                   val_csv=write_csv(folder / "val.csv", val_x, val_y), features=features, classes=classes,
                   val_x=val_x, val_y=val_y)
