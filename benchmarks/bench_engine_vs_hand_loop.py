"""Engine vs. a hand-written online-KD loop: same teacher, student, data, epochs, loss.

Three ways of distilling one teacher MLP into one student MLP, timed in the same
process and interleaved (engine, hand+DataLoader, hand+randperm, engine, ...):

  (a) engine     ``distill.train.run_distillation`` on a JobSpec whose files this
                 script writes: teacher .safetensors, an unlabeled transfer-set CSV
                 and a labeled validation CSV. The engine runs the teacher once over
                 the transfer set and reuses those logits every epoch.
  (b) hand+DL    the loop people usually write for online KD (TRL / torchtune
                 style): TensorDataset + DataLoader(shuffle=True), the teacher in
                 eval() under no_grad() on EVERY batch of EVERY epoch.
  (c) hand+perm  (b) without the DataLoader: pre-loaded tensors sliced with a
                 randperm, still one teacher forward per batch. (b) vs (c) is the
                 data-loading overhead; (c) vs (a) is what caching the teacher buys.

All three use the same loss (``distill.losses.distillation_loss`` with labels=None,
i.e. forward KL on T-softened distributions, times T^2), AdamW with the same lr
and no weight decay, a constant lr, the same batch size and the same seed.

Run:  .venv/bin/python benchmarks/bench_engine_vs_hand_loop.py [--epochs 3] [--device cpu]
Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.data import load_dataset
from distill.device import resolve_device
from distill.evaluate import classification_metrics
from distill.losses import distillation_loss
from distill.models import MLP, MLPArchitecture, load_model, save_model
from distill.spec import Hyperparameters, JobSpec, StudentSpec
from distill.teacher_signal import compute_logits
from distill.train import run_distillation

SEED = 0
LEARNING_RATE = 1e-3
TEMPERATURE = 4.0
CLUSTERS_PER_CLASS = 3
CENTRE_STD = 0.55  # per-feature std of the cluster centres; the noise has std 1, so neighbouring blobs overlap


# --------------------------------------------------------------------------- data


def make_problem(rows: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: each class is a mixture of a few unit-variance blobs.

    Returns features (rows, features) float32 and labels (rows,) int64. Several blobs
    per class make the decision boundary non-linear, so a wide teacher beats a linear
    model and the student has something to learn from the teacher's soft targets.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes * CLUSTERS_PER_CLASS, features, generator=g) * CENTRE_STD
    cluster = torch.randint(0, len(centres), (rows,), generator=g)
    x = centres[cluster] + torch.randn(rows, features, generator=g)
    return x.float(), cluster // CLUSTERS_PER_CLASS


def write_csv(path: Path, x: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """CSV in the engine's format: header f0..f{D-1} (+ ``label`` when labeled)."""
    header = [f"f{j}" for j in range(x.shape[1])]
    columns = [x.numpy()]
    fmt = ["%.7g"] * x.shape[1]
    if labels is not None:
        header.append("label")
        columns.append(labels.numpy()[:, None])
        fmt.append("%d")
    np.savetxt(path, np.hstack(columns), fmt=fmt, delimiter=",", header=",".join(header), comments="")
    return path


# --------------------------------------------------------------------------- teacher


def train_teacher(x: torch.Tensor, y: torch.Tensor, hidden: list[int], classes: int, epochs: int,
                  batch_size: int, device: torch.device) -> MLP:
    """A few epochs of plain cross-entropy so the teacher's logits mean something (untimed)."""
    torch.manual_seed(SEED)
    teacher = MLP(MLPArchitecture(input_dim=x.shape[1], hidden_dims=hidden, num_classes=classes)).to(device)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=LEARNING_RATE)
    x, y = x.to(device), y.to(device)
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(teacher(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return teacher.eval()


# --------------------------------------------------------------------------- the three variants


@dataclass
class Setup:
    """Everything the variants share; built once, untimed."""

    tmp: Path
    teacher_path: Path
    train_csv: Path  # unlabeled transfer set
    val_csv: Path  # labeled validation set
    teacher: MLP  # the teacher as loaded from teacher_path, in eval mode on device
    train_x: torch.Tensor  # (N, D) exactly as the engine parses train_csv, on CPU
    val_x: torch.Tensor  # (Nv, D) on device
    val_y: torch.Tensor  # (Nv,) on device
    val_teacher_logits: torch.Tensor  # (Nv, C) on device
    student_arch: MLPArchitecture
    epochs: int
    batch_size: int
    device: torch.device


@dataclass
class Outcome:
    seconds: float  # wall time of the timed region
    agreement: float  # student argmax == teacher argmax on the validation set, 0..1
    accuracy: float  # student argmax == label on the validation set, 0..1
    stages: dict[str, float] = field(default_factory=dict)  # engine only: seconds per stage


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score(setup: Setup, student: nn.Module) -> tuple[float, float]:
    """(agreement with the teacher, accuracy) of ``student`` on the validation set."""
    student_logits = compute_logits(student, setup.val_x, setup.device)
    metrics = classification_metrics(student_logits, setup.val_teacher_logits, setup.val_y)
    return metrics["agreement"], metrics["student_accuracy"]


def run_engine(setup: Setup, repeat: int) -> Outcome:
    """(a) The whole ``run_distillation`` call: parse files, teacher once, train, evaluate, export."""
    spec = JobSpec(
        teacher=setup.teacher_path,
        training_file=setup.train_csv,
        validation_file=setup.val_csv,
        student=StudentSpec(hidden_dims=list(setup.student_arch.hidden_dims)),
        # constant lr and no weight decay: the same optimisation as the hand loops' plain AdamW
        hyperparameters=Hyperparameters(epochs=setup.epochs, batch_size=setup.batch_size, learning_rate=LEARNING_RATE,
                                        temperature=TEMPERATURE, seed=SEED, weight_decay=0.0,
                                        lr_scheduler="constant"),
    )
    stage_starts: list[tuple[str, float]] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "stage":
            stage_starts.append((data["stage"], time.perf_counter()))

    torch.manual_seed(SEED)  # the engine seeds itself with hp.seed too; kept for symmetry
    sync(setup.device)
    start = time.perf_counter()
    result = run_distillation(spec, setup.tmp / f"engine-run-{repeat}", on_event=on_event, device=str(setup.device))
    sync(setup.device)
    end = time.perf_counter()
    # seconds per stage: from one stage event to the next (the last one runs to the return)
    marks = stage_starts + [("end", end)]
    stages = {name: t_next - t for (name, t), (_, t_next) in zip(marks[:-1], marks[1:])}
    return Outcome(end - start, result.evaluation["agreement"], result.evaluation["student"]["accuracy"], stages)


def _hand_step(setup: Setup, student: MLP, optimizer: torch.optim.Optimizer, xb: torch.Tensor) -> None:
    """One online-KD step: teacher forward on this batch, then the student update."""
    with torch.no_grad():
        teacher_logits = setup.teacher(xb)  # (B, C): recomputed every batch, every epoch
    loss = distillation_loss(student(xb), teacher_logits, None, TEMPERATURE, alpha=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _new_student(setup: Setup) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    student = MLP(setup.student_arch).to(setup.device).train()
    # weight_decay=0.0 explicitly: torch's AdamW defaults to 0.01, the engine's spec to 0.0
    return student, torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, weight_decay=0.0)


def run_hand_dataloader(setup: Setup, repeat: int) -> Outcome:
    """(b) TensorDataset + DataLoader(shuffle=True); batches move to the device as they come."""
    sync(setup.device)
    start = time.perf_counter()
    student, optimizer = _new_student(setup)
    loader = DataLoader(TensorDataset(setup.train_x), batch_size=setup.batch_size, shuffle=True)
    for _ in range(setup.epochs):
        for (xb,) in loader:
            _hand_step(setup, student, optimizer, xb.to(setup.device, non_blocking=True))
    sync(setup.device)
    seconds = time.perf_counter() - start
    return Outcome(seconds, *score(setup, student))  # scored after the clock stops


def run_hand_randperm(setup: Setup, repeat: int) -> Outcome:
    """(c) Tensors already on the device, sliced with a fresh randperm each epoch."""
    train_x = setup.train_x.to(setup.device)  # the engine's time includes its copy; this one is untimed
    sync(setup.device)
    start = time.perf_counter()
    student, optimizer = _new_student(setup)
    n = len(train_x)
    for _ in range(setup.epochs):
        order = torch.randperm(n, device=setup.device)
        for first in range(0, n, setup.batch_size):
            _hand_step(setup, student, optimizer, train_x[order[first : first + setup.batch_size]])
    sync(setup.device)
    seconds = time.perf_counter() - start
    return Outcome(seconds, *score(setup, student))


ENGINE = "(a) engine: teacher once"
HAND_DL = "(b) hand: DataLoader, teacher/batch"
HAND_PERM = "(c) hand: randperm, teacher/batch"
VARIANTS = {ENGINE: run_engine, HAND_DL: run_hand_dataloader, HAND_PERM: run_hand_randperm}


# --------------------------------------------------------------------------- driver


def build_setup(args: argparse.Namespace, tmp: Path, device: torch.device) -> tuple[Setup, float]:
    """Write the job's files, train the teacher; returns the setup and the teacher's validation accuracy."""
    x, y = make_problem(args.rows + args.val_rows, args.features, args.classes, SEED)
    train_x, train_y, val_x, val_y = x[: args.rows], y[: args.rows], x[args.rows :], y[args.rows :]
    trained = train_teacher(train_x, train_y, args.teacher_hidden, args.classes, args.teacher_epochs,
                            args.batch_size, device)
    teacher_path = save_model(trained, tmp / "teacher.safetensors")
    train_csv = write_csv(tmp / "transfer.csv", train_x, None)  # no label column: the unlabeled case
    val_csv = write_csv(tmp / "validation.csv", val_x, val_y)

    # The hand loops get exactly the tensors and teacher the engine will read from disk.
    teacher = load_model(teacher_path, device)
    train_parsed = load_dataset(train_csv)
    val_parsed = load_dataset(val_csv)
    val_x_dev, val_y_dev = val_parsed.features.to(device), val_parsed.labels.to(device)
    val_teacher_logits = compute_logits(teacher, val_x_dev, device)
    teacher_accuracy = (val_teacher_logits.argmax(-1) == val_y_dev).float().mean().item()
    student_arch = MLPArchitecture(input_dim=args.features, hidden_dims=args.student_hidden, num_classes=args.classes)
    setup = Setup(tmp, teacher_path, train_csv, val_csv, teacher, train_parsed.features, val_x_dev, val_y_dev,
                  val_teacher_logits, student_arch, args.epochs, args.batch_size, device)
    return setup, teacher_accuracy


def print_table(args: argparse.Namespace, results: dict[str, list[Outcome]]) -> None:
    median_s = {name: statistics.median(o.seconds for o in outcomes) for name, outcomes in results.items()}
    engine_s = median_s[ENGINE]
    samples = args.rows * args.epochs  # student training samples per run
    name_w = max(len(name) for name in results)
    header = (f"{'variant':<{name_w}}  {'median s':>9}  {'samples/s':>10}  {'hand/engine':>11}  "
              f"{'range s':>11}  {'teacher fwd':>11}  {'val agree':>9}  {'val acc':>7}")
    print(header)
    print("-" * len(header))
    for name, outcomes in results.items():
        seconds = median_s[name]
        is_engine = name == ENGINE
        ratio = "1.00x" if is_engine else f"{seconds / engine_s:.2f}x"
        # teacher forwards (rows): the engine labels transfer + validation set once; the hand
        # loops label every training row every epoch (their final scoring reuses cached val logits)
        teacher_rows = args.rows + args.val_rows if is_engine else args.rows * args.epochs
        spread = f"{min(o.seconds for o in outcomes):.2f}-{max(o.seconds for o in outcomes):.2f}"
        agreement = statistics.median(o.agreement for o in outcomes)
        accuracy = statistics.median(o.accuracy for o in outcomes)
        print(f"{name:<{name_w}}  {seconds:>9.2f}  {samples / seconds:>10,.0f}  {ratio:>11}  "
              f"{spread:>11}  {teacher_rows:>11,}  {agreement:>9.2%}  {accuracy:>7.2%}")
    print("-" * len(header))

    stage_medians = {stage: statistics.median(o.stages.get(stage, 0.0) for o in results[ENGINE])
                     for stage in results[ENGINE][0].stages}
    notes = [
        f"median of {args.repeats} interleaved runs per variant (min-max in 'range s'); "
        f"samples/s = rows x epochs / median s = {args.rows:,} x {args.epochs} / s;",
        "hand/engine > 1 means the engine is faster. 'teacher fwd' = rows pushed through the teacher per run.",
        f"val agree = student argmax == teacher argmax, val acc = student argmax == label, on {args.val_rows:,} "
        "validation rows.",
        "Conservative for the engine: its time is the whole run_distillation call, i.e. parsing both CSVs and the "
        "teacher file,",
        "teacher inference, per-epoch validation, the final evaluation (incl. latency measurement of teacher and "
        "student, up to ~1 s)",
        "and the export (safetensors + state.json; a run shorter than checkpoint_interval_s = 60 s writes no "
        "intermediate checkpoint).",
        "The hand loops time only student init + the training loop, on tensors already in memory; their scoring is "
        "untimed.",
    ]
    print("\n".join(notes))
    print("engine stages (median s): " + ", ".join(f"{s} {t:.2f}" for s, t in stage_medians.items()))
    print(f"split of the gap: DataLoader vs randperm (b)/(c) = {median_s[HAND_DL] / median_s[HAND_PERM]:.2f}x; "
          f"teacher per batch vs once (c)/(a) = {median_s[HAND_PERM] / engine_s:.2f}x")


def parse_args() -> argparse.Namespace:
    def widths(text: str) -> list[int]:
        return [int(w) for w in text.split(",") if w.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000, help="transfer-set rows (default 20000)")
    p.add_argument("--val-rows", type=int, default=2_000, help="validation rows (default 2000)")
    p.add_argument("--features", type=int, default=64, help="input features D (default 64)")
    p.add_argument("--classes", type=int, default=10, help="classes C (default 10)")
    p.add_argument("--epochs", type=int, default=10, help="distillation epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="minibatch size (default 256)")
    p.add_argument("--teacher-hidden", type=widths, default=[1024, 1024, 1024],
                   help="teacher hidden widths, comma-separated (default 1024,1024,1024)")
    p.add_argument("--student-hidden", type=widths, default=[64], help="student hidden widths (default 64)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="epochs of teacher pre-training, untimed (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, interleaved (default 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda:N (default auto)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__} | python {platform.python_version()} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"))

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        t0 = time.perf_counter()
        setup, teacher_accuracy = build_setup(args, Path(tmp), device)
        teacher_params = setup.teacher.architecture.num_parameters
        print(f"problem: {args.rows:,} transfer rows (unlabeled CSV) + {args.val_rows:,} validation rows, "
              f"D={args.features}, C={args.classes}; epochs {args.epochs}, batch {args.batch_size}, "
              f"lr {LEARNING_RATE}, T={TEMPERATURE}")
        print(f"teacher {args.features}->{args.teacher_hidden}->{args.classes} ({teacher_params:,} params, "
              f"val acc {teacher_accuracy:.2%}); student {args.features}->{args.student_hidden}->{args.classes} "
              f"({setup.student_arch.num_parameters:,} params); setup {time.perf_counter() - t0:.1f} s (untimed)")
        print()

        results: dict[str, list[Outcome]] = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):  # interleaved, so drift (thermal, other load) hits all variants alike
            for name, variant in VARIANTS.items():
                results[name].append(variant(setup, repeat))
        print_table(args, results)


if __name__ == "__main__":
    main()
