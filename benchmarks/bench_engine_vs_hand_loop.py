"""Engine vs. a hand-written online-KD loop, start to finish: same teacher, student, data, epochs, loss.

One teacher MLP (default 32 -> 1024x3 -> 10, trained briefly on a synthetic Gaussian-cluster
problem, untimed) is distilled into one student MLP (32 -> 64 -> 10) two ways, at each
epoch count of ``--epochs`` (default 4 and 10), in the same process, interleaved:

  engine   ``distill.train.run_distillation`` on a JobSpec over files this script writes
           (teacher .safetensors, an unlabeled transfer-set CSV, a labeled validation CSV).
           Timed from the call to its return: parse both CSVs, load the teacher, build the
           student, run the teacher ONCE over the data (its logits are reused every epoch),
           train with per-epoch validation, the final evaluation (incl. latency
           measurement) and the export.
  hand     the loop a user writes in the seed article's style (the teacher on EVERY batch
           of EVERY epoch): read the same transfer CSV with numpy (``--reader csv``: the csv
           module), an ``nn.Module`` teacher loaded from the same safetensors file, the
           student, ``optim.Adam``, ``DataLoader(TensorDataset(x), shuffle=True)``, per batch
           ``teacher(x)`` under ``no_grad`` and ``KLDivLoss(batchmean)(log_softmax(s/T),
           softmax(t/T)) * T**2``. Timed from reading the CSV to the end of the last epoch;
           it skips evaluation (the student is scored after the clock stops).
  hand+perm  (only with ``--randperm``) the hand loop slicing the tensor with a randperm
           instead of a DataLoader: hand / hand+perm is the DataLoader's share.

Same optimisation on both sides: Adam(W) with no weight decay, a constant learning rate, no
gradient clipping (the engine's spec sets ``lr_scheduler="constant"``, ``weight_decay=0``,
``max_grad_norm=0``), the same batch size, temperature and seed; no labels in the transfer
set, so the engine's loss is the pure soft-target loss, the same as the hand loop's.

Besides the table, the engine's time is split into stages (from its ``on_event`` stage
events) and into named parts (CSV parse, teacher load, teacher inference, steps, validation
per epoch, evaluation, export), measured by timers this script wraps around engine
functions for the run (no engine code changes; the wrappers cost a few microseconds per
step). ``--profile`` also runs the engine once more under cProfile and prints the top
functions by cumulative time.

Run:  .venv/bin/python benchmarks/bench_engine_vs_hand_loop.py                  # ~2-3 min on a quiet 2-core CPU
      .venv/bin/python benchmarks/bench_engine_vs_hand_loop.py --epochs 4 10 20 --repeats 3
      .venv/bin/python benchmarks/bench_engine_vs_hand_loop.py --profile --epochs 4
      .venv/bin/python benchmarks/bench_engine_vs_hand_loop.py --help
Prints tables; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import os
import platform
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill.evaluate
import distill.kinds.mlp
import distill.loop
import distill.recipes.classification
from distill.data import load_dataset
from distill.device import resolve_device
from distill.evaluate import classification_metrics
from distill.models import MLP, MLPArchitecture, load_model, save_model
from distill.recipes.classification import MLPClassification
from distill.spec import Hyperparameters, JobSpec, StudentSpec
from distill.teacher_signal import compute_logits
from distill.train import run_distillation

SEED = 0
LEARNING_RATE = 1e-3
TEMPERATURE = 4.0
CLUSTERS_PER_CLASS = 3
CENTRE_STD = 0.55  # per-feature std of the cluster centres; the noise has std 1, so neighbouring blobs overlap
GOAL_RATIO = 1.5  # the goal: engine at most 1.5x the hand loop at the smallest epoch count


# --------------------------------------------------------------------------- data and teacher (untimed setup)


def make_problem(rows: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: each class a mixture of a few unit-variance blobs, so the
    boundary is non-linear and the student has something to learn from soft targets.
    Returns features (rows, features) float32 and labels (rows,) int64."""
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


def train_teacher(x: torch.Tensor, y: torch.Tensor, hidden: list[int], classes: int, epochs: int,
                  batch_size: int) -> MLP:
    """A few epochs of plain cross-entropy so the teacher's logits mean something (untimed, CPU)."""
    torch.manual_seed(SEED)
    teacher = MLP(MLPArchitecture(input_dim=x.shape[1], hidden_dims=hidden, num_classes=classes))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=LEARNING_RATE)
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(teacher(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return teacher.eval()


@dataclass
class Setup:
    """Everything the variants share; built once, untimed."""

    tmp: Path
    teacher_path: Path
    train_csv: Path  # unlabeled transfer set
    val_csv: Path  # labeled validation set
    val_x: torch.Tensor  # (Nv, D) on device, for scoring the hand loop's student
    val_y: torch.Tensor  # (Nv,)
    val_teacher_logits: torch.Tensor  # (Nv, C)
    features: int
    teacher_hidden: list[int]
    student_hidden: list[int]
    classes: int
    batch_size: int
    reader: str
    device: torch.device


@dataclass
class Outcome:
    seconds: float  # wall time, start to finish
    agreement: float  # student argmax == teacher argmax on the validation set, 0..1
    accuracy: float  # student argmax == label on the validation set, 0..1
    parts: dict[str, float] = field(default_factory=dict)  # seconds per named part
    stages: dict[str, float] = field(default_factory=dict)  # engine: seconds per on_event stage


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the engine, with part timers


MISSING_TARGETS: set[str] = set()


class PartTimers:
    """Wraps engine functions in wall-clock timers for one run and restores them after.

    Names are looked up where the engine calls them (module globals, class attributes), so
    the engine's own code runs unchanged. On CUDA the per-step parts are launch times
    (kernels run asynchronously); the stages (from on_event) are synced at the run's end only."""

    # (owner, attribute, part name)
    TARGETS = [
        (distill.recipes.classification, "load_dataset", "parse CSV (load_dataset)"),
        (distill.kinds.mlp, "load_model", "load teacher file"),
        (distill.recipes.classification, "compute_logits", None),  # teacher inference, or student in validate
        (MLPClassification, "batch_loss", "steps: batch_loss (student fwd + loss)"),
        (distill.loop, "_optimizer_step", "steps: optimizer step (+ zero_grad)"),
        (distill.loop, "epoch_order", "steps: epoch_order (shuffle)"),
        (distill.loop, "save_checkpoint", "step checkpoints"),
        (MLPClassification, "validate", "validation per epoch"),
        (distill.evaluate, "measure_latency", "evaluate: latency measurement"),
        (MLPClassification, "evaluate", "evaluate: total"),
        (MLPClassification, "export", "export model file"),
    ]

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.phase = "loading"  # compute_logits in validate() is the student, elsewhere the teacher
        self.saved: list[tuple[object, str, object]] = []

    def _wrap(self, function, name: str | None, attribute: str):
        timers = self

        def timed(*args, **kwargs):
            part = name
            if part is None:  # compute_logits
                part = "validation per epoch" if timers.phase == "validate" else "teacher inference (compute_logits)"
            outer = timers.phase
            if attribute == "validate":
                timers.phase = "validate"
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                timers.phase = outer
                if not (name is None and part == "validation per epoch"):  # counted in validate already
                    timers.seconds[part] += elapsed

        return timed

    def __enter__(self) -> "PartTimers":
        for owner, attribute, name in self.TARGETS:
            # class attributes from the class's own __dict__, so a wrapped method unwraps to itself
            original = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
            if original is None:  # renamed in the engine: that part is then counted in "other"/"backward"
                MISSING_TARGETS.add(f"{getattr(owner, '__name__', owner)}.{attribute}")
                continue
            self.saved.append((owner, attribute, original))
            setattr(owner, attribute, self._wrap(original, name, attribute))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attribute, original in reversed(self.saved):
            setattr(owner, attribute, original)
        self.saved.clear()


def engine_spec(setup: Setup, epochs: int) -> JobSpec:
    return JobSpec(
        teacher=setup.teacher_path,
        training_file=setup.train_csv,
        validation_file=setup.val_csv,
        student=StudentSpec(architecture={"kind": "mlp", "hidden_dims": list(setup.student_hidden)}),
        # the hand loop's optimisation: Adam == AdamW without weight decay, constant lr, no clipping
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=setup.batch_size, learning_rate=LEARNING_RATE,
                                        temperature=TEMPERATURE, seed=SEED, weight_decay=0.0,
                                        lr_scheduler="constant", max_grad_norm=0.0),
    )


def run_engine(setup: Setup, epochs: int, tag: str) -> Outcome:
    """The whole ``run_distillation`` call: parse files, teacher once, train, evaluate, export."""
    spec = engine_spec(setup, epochs)
    marks: list[tuple[str, float]] = []
    epoch_ends: list[float] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "stage":
            marks.append((data["stage"], time.perf_counter()))
        elif kind == "epoch":
            epoch_ends.append(time.perf_counter())

    with PartTimers(setup.device) as timers:
        sync(setup.device)
        start = time.perf_counter()
        result = run_distillation(spec, setup.tmp / f"engine-{tag}", on_event=on_event, device=str(setup.device))
        sync(setup.device)
        end = time.perf_counter()
    # seconds per stage, from one stage event to the next; the last runs to the return
    bounds = [("(before first event)", start)] + marks + [("end", end)]
    stages = {name: t_next - t for (name, t), (_, t_next) in zip(bounds[:-1], bounds[1:])}
    parts = dict(timers.seconds)
    evaluation = result.evaluation
    return Outcome(end - start, evaluation["agreement"], evaluation["student"]["accuracy"], parts, stages)


# --------------------------------------------------------------------------- the hand loop (seed style)


class SeedMLP(nn.Module):
    """An MLP the way a user writes one; parameter names ``layers.{k}.*`` match the teacher file."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def seed_distillation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor,
                           temperature: float = TEMPERATURE) -> torch.Tensor:
    """The seed article's loss: KL(teacher ‖ student) on T-softened distributions, times T²."""
    student_log_prob = torch.log_softmax(student_output / temperature, dim=1)
    teacher_prob = torch.softmax(teacher_output / temperature, dim=1)
    return nn.KLDivLoss(reduction="batchmean")(student_log_prob, teacher_prob) * temperature**2


def read_features(path: Path, reader: str) -> np.ndarray:
    """The transfer CSV as a user reads it: numpy.loadtxt, or the csv module row by row."""
    if reader == "numpy":
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header
        return np.array([[float(cell) for cell in row] for row in rows], dtype=np.float32)


def run_hand(setup: Setup, epochs: int, tag: str, randperm: bool = False) -> Outcome:
    """Start -> finish: read the CSV, build teacher (from the file) + student + optimizer, train."""
    device, parts = setup.device, {}
    sync(device)
    start = time.perf_counter()
    x = torch.from_numpy(read_features(setup.train_csv, setup.reader))
    t_read = time.perf_counter()
    teacher = SeedMLP([setup.features, *setup.teacher_hidden, setup.classes])
    teacher.load_state_dict(load_file(str(setup.teacher_path)))
    teacher = teacher.to(device).eval()
    torch.manual_seed(SEED)
    student = SeedMLP([setup.features, *setup.student_hidden, setup.classes]).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=LEARNING_RATE)
    t_built = time.perf_counter()
    if randperm:
        x = x.to(device)
        batches_of = lambda: (x[i] for i in torch.randperm(len(x), device=device).split(setup.batch_size))  # noqa: E731
    else:
        loader = DataLoader(TensorDataset(x), batch_size=setup.batch_size, shuffle=True)
        batches_of = lambda: (xb.to(device, non_blocking=True) for (xb,) in loader)  # noqa: E731
    student.train()
    for _ in range(epochs):
        for xb in batches_of():
            with torch.no_grad():
                teacher_output = teacher(xb)  # (B, C): recomputed every batch, every epoch
            loss = seed_distillation_loss(student(xb), teacher_output)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    sync(device)
    end = time.perf_counter()
    parts = {"read CSV": t_read - start, "build models + load teacher": t_built - t_read, "training": end - t_built}
    # scored after the clock stops
    student.eval()
    with torch.no_grad():
        metrics = classification_metrics(student(setup.val_x), setup.val_teacher_logits, setup.val_y)
    return Outcome(end - start, metrics["agreement"], metrics["student_accuracy"], parts)


# --------------------------------------------------------------------------- driver


def build_setup(args: argparse.Namespace, tmp: Path, device: torch.device) -> tuple[Setup, float]:
    """Write the job's files and train the teacher; returns the setup and the teacher's validation accuracy."""
    x, y = make_problem(args.rows + args.val_rows, args.features, args.classes, SEED)
    train_x, train_y, val_x, val_y = x[:args.rows], y[:args.rows], x[args.rows:], y[args.rows:]
    trained = train_teacher(train_x, train_y, args.teacher_hidden, args.classes, args.teacher_epochs,
                            args.batch_size)
    teacher_path = save_model(trained, tmp / "teacher.safetensors")
    train_csv = write_csv(tmp / "transfer.csv", train_x, None)  # no label column: the unlabeled case
    val_csv = write_csv(tmp / "validation.csv", val_x, val_y)
    # The hand loop's student is scored on what the engine validates on: the parsed validation file.
    val = load_dataset(val_csv)
    val_x_dev, val_y_dev = val.features.to(device), val.labels.to(device)
    val_teacher_logits = compute_logits(load_model(teacher_path, device), val_x_dev, device)
    teacher_accuracy = (val_teacher_logits.argmax(-1) == val_y_dev).float().mean().item()
    setup = Setup(tmp, teacher_path, train_csv, val_csv, val_x_dev, val_y_dev, val_teacher_logits, args.features,
                  args.teacher_hidden, args.student_hidden, args.classes, args.batch_size, args.reader, device)
    return setup, teacher_accuracy


def warm_up(setup: Setup) -> None:
    """One tiny untimed run of each, so lazy imports and first-call costs hit neither timed run
    (a worker process serving jobs is warm too)."""
    warm_csv = write_csv(setup.tmp / "warm-up.csv", setup.val_x[:512].cpu(), None)
    small = Setup(**{**setup.__dict__, "train_csv": warm_csv})
    run_engine(small, 1, "warm-up")
    run_hand(small, 1, "warm-up")
    run_hand(small, 1, "warm-up", randperm=True)


def median(outcomes: list[Outcome], attribute: str) -> float:
    return statistics.median(getattr(o, attribute) for o in outcomes)


def fastest(outcomes: list[Outcome]) -> Outcome:
    """The run least disturbed by other load on the machine (its parts add up, unlike per-part medians)."""
    return min(outcomes, key=lambda o: o.seconds)


def print_main_table(args, results: dict[int, dict[str, list[Outcome]]]) -> None:
    perm = args.randperm
    header = (f"{'epochs':>6}  {'engine s':>9}  {'hand s':>8}  {'engine/hand':>11}  {'best-of ratio':>13}  "
              f"{'range engine s':>14}  {'range hand s':>12}  {'agree engine':>12}  {'agree hand':>10}  "
              f"{'acc engine':>10}  {'acc hand':>8}" + (f"  {'hand+perm s':>11}  {'engine/perm':>11}" if perm else ""))
    print(header)
    print("-" * len(header))

    def span(outcomes: list[Outcome]) -> str:
        return f"{min(o.seconds for o in outcomes):.2f}-{max(o.seconds for o in outcomes):.2f}"

    for epochs, by_variant in results.items():
        engine, hand = by_variant["engine"], by_variant["hand"]
        e_s, h_s = median(engine, "seconds"), median(hand, "seconds")
        best = fastest(engine).seconds / fastest(hand).seconds
        line = (f"{epochs:>6}  {e_s:>9.2f}  {h_s:>8.2f}  {e_s / h_s:>10.2f}x  {best:>12.2f}x  {span(engine):>14}  "
                f"{span(hand):>12}  {median(engine, 'agreement'):>12.2%}  {median(hand, 'agreement'):>10.2%}  "
                f"{median(engine, 'accuracy'):>10.2%}  {median(hand, 'accuracy'):>8.2%}")
        if perm:
            p_s = median(by_variant["hand+perm"], "seconds")
            line += f"  {p_s:>11.2f}  {e_s / p_s:>10.2f}x"
        print(line)
    print("-" * len(header))
    ratio = lambda e: median(results[e]["engine"], "seconds") / median(results[e]["hand"], "seconds")  # noqa: E731
    first = min(results)
    verdicts = [f"{first} epochs: engine/hand {ratio(first):.2f}x, goal <= {GOAL_RATIO}x: "
                + ("met" if ratio(first) <= GOAL_RATIO else "MISSED")]
    for epochs in sorted(results)[1:]:
        verdicts.append(f"{epochs} epochs: {ratio(epochs):.2f}x ("
                        + ("engine faster" if ratio(epochs) < 1 else "engine NOT faster") + ")")
    print("; ".join(verdicts))
    print(f"engine s, hand s: median of {args.repeats} interleaved run(s); engine/hand: of the medians (< 1: the "
          "engine is faster); best-of ratio: fastest engine run / fastest hand run.")
    print("Both are start -> finish: the engine's whole run_distillation (parse CSVs, teacher once, train + per-epoch "
          "validation, evaluate incl. latency, export);")
    print(f"the hand loop's CSV read ({args.reader}) + model building + training (teacher every batch), no evaluation. "
          "agree / acc: student argmax vs teacher argmax / vs label,")
    print(f"on the {args.val_rows:,} validation rows. Teacher rows forwarded per run: engine "
          f"{args.rows + args.val_rows:,} (once); hand {args.rows:,} x epochs.")


BACKWARD = "steps: backward + loop bookkeeping (training stage - the above)"
OTHER = "other (student build, .to(device), state file, events)"
PART_ORDER = ["parse CSV", "load teacher", "teacher inference", "steps: epoch_order", "steps: batch_loss", BACKWARD,
              "steps: optimizer", "step checkpoints", "validation per epoch", "evaluate: metrics", "evaluate: latency",
              "export", OTHER]


def part_rank(name: str) -> int:
    """Pipeline order: where ``name`` comes in PART_ORDER (unknown names last)."""
    return next((i for i, prefix in enumerate(PART_ORDER) if name.startswith(prefix)), len(PART_ORDER))


def print_breakdown(args, results: dict[int, dict[str, list[Outcome]]]) -> None:
    print()
    print("Where the time goes (the fastest run of each; seconds and share of its total):")
    if MISSING_TARGETS:
        print(f"  (not timed, no longer in the engine: {', '.join(sorted(MISSING_TARGETS))})")
    for epochs, by_variant in results.items():
        engine, hand = fastest(by_variant["engine"]), fastest(by_variant["hand"])
        parts = dict(engine.parts)
        # shown as two halves, so the lines add up
        latency = parts.get("evaluate: latency measurement", 0.0)
        parts["evaluate: metrics (student on validation rows)"] = parts.pop("evaluate: total", latency) - latency
        steps = sum(v for k, v in parts.items() if k.startswith("steps:"))
        training = engine.stages.get("training", 0.0)
        # the rest of the training stage: backward (autograd, not in a wrapped function) and the
        # loop's own bookkeeping (loss accumulation, throttles, events)
        parts[BACKWARD] = training - steps - parts.get("validation per epoch", 0.0) - parts.get("step checkpoints", 0.0)
        steps += parts[BACKWARD]
        parts[OTHER] = engine.seconds - sum(parts.values())
        batches = -(-args.rows // args.batch_size) * epochs
        print(f"\n  {epochs} epochs - engine {engine.seconds:.2f} s; stages: "
              + ", ".join(f"{k} {v:.3f}" for k, v in engine.stages.items()))
        for name in sorted(parts, key=part_rank):
            print(f"    {name:<66} {parts[name]:7.3f} s  {parts[name] / engine.seconds:6.1%}")
        fixed = engine.seconds - steps
        print(f"    {'= fixed cost (everything but the ' + format(batches, ',') + ' steps)':<66} {fixed:7.3f} s  "
              f"{fixed / engine.seconds:6.1%}")
        print(f"    {'= the steps':<66} {steps:7.3f} s  {steps / engine.seconds:6.1%}  "
              f"({steps / batches * 1e3:.3f} ms/step)")
        print(f"  {epochs} epochs - hand {hand.seconds:.2f} s: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in hand.parts.items())
              + f"; {hand.parts['training'] / batches * 1e3:.3f} ms/step (teacher forward + student step)")


def profile_engine(setup: Setup, epochs: int, top: int) -> None:
    """One more engine run under cProfile (its own overhead inflates per-call costs; read the shares)."""
    profiler = cProfile.Profile()
    sync(setup.device)
    start = time.perf_counter()
    profiler.enable()
    run_distillation(engine_spec(setup, epochs), setup.tmp / "engine-profile", device=str(setup.device))
    sync(setup.device)
    profiler.disable()
    print()
    print(f"cProfile of one engine run at {epochs} epochs ({time.perf_counter() - start:.2f} s under the profiler), "
          f"top {top} by cumulative time:")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    print(out.getvalue().split("\n", 4)[-1].rstrip())


def parse_args() -> argparse.Namespace:
    def widths(text: str) -> list[int]:
        return [int(w) for w in text.split(",") if w.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=40_000, help="transfer-set rows (default 40000)")
    p.add_argument("--val-rows", type=int, default=2_000, help="validation rows (default 2000)")
    p.add_argument("--features", type=int, default=32, help="input features D (default 32)")
    p.add_argument("--classes", type=int, default=10, help="classes C (default 10)")
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 10], help="epoch counts to compare (default 4 10)")
    p.add_argument("--batch-size", type=int, default=256, help="minibatch size (default 256)")
    p.add_argument("--teacher-hidden", type=widths, default=[1024, 1024, 1024],
                   help="teacher hidden widths, comma-separated (default 1024,1024,1024)")
    p.add_argument("--student-hidden", type=widths, default=[64], help="student hidden widths (default 64)")
    p.add_argument("--teacher-epochs", type=int, default=1, help="epochs of teacher pre-training, untimed (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and epoch count, interleaved "
                                                           "(default 3)")
    p.add_argument("--reader", choices=["numpy", "csv"], default="numpy",
                   help="how the hand loop reads the CSV (default numpy.loadtxt)")
    p.add_argument("--randperm", action="store_true", help="also time the hand loop without a DataLoader")
    p.add_argument("--profile", action="store_true", help="also run the engine once under cProfile (first epoch count)")
    p.add_argument("--profile-top", type=int, default=30, help="functions shown with --profile (default 30)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default: one per core)")
    args = p.parse_args()
    args.epochs = sorted(set(args.epochs))
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__} | python {platform.python_version()} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"))

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        t0 = time.perf_counter()
        setup, teacher_accuracy = build_setup(args, Path(tmp), device)
        arch = MLPArchitecture(input_dim=args.features, hidden_dims=args.teacher_hidden, num_classes=args.classes)
        student = MLPArchitecture(input_dim=args.features, hidden_dims=args.student_hidden, num_classes=args.classes)
        print(f"problem: {args.rows:,} transfer rows (unlabeled CSV, {setup.train_csv.stat().st_size / 1e6:.1f} MB) "
              f"+ {args.val_rows:,} validation rows, D={args.features}, C={args.classes}; batch {args.batch_size}, "
              f"lr {LEARNING_RATE} constant, T={TEMPERATURE}, no clipping")
        print(f"teacher {args.features}->{args.teacher_hidden}->{args.classes} ({arch.num_parameters:,} params, "
              f"val acc {teacher_accuracy:.2%}); student {args.features}->{args.student_hidden}->{args.classes} "
              f"({student.num_parameters:,} params)")
        warm_up(setup)
        print(f"setup + warm-up {time.perf_counter() - t0:.1f} s (untimed)")
        print()

        variants = {"engine": lambda e, tag: run_engine(setup, e, tag), "hand": lambda e, tag: run_hand(setup, e, tag)}
        if args.randperm:
            variants["hand+perm"] = lambda e, tag: run_hand(setup, e, tag, randperm=True)
        results: dict[int, dict[str, list[Outcome]]] = {e: {name: [] for name in variants} for e in args.epochs}
        for repeat in range(args.repeats):  # interleaved, so drift (thermal, other load) hits every variant alike
            for epochs in args.epochs:
                for name, variant in variants.items():
                    results[epochs][name].append(variant(epochs, f"{epochs}-{repeat}"))
        print_main_table(args, results)
        print_breakdown(args, results)
        if args.profile:
            profile_engine(setup, args.epochs[0], args.profile_top)


if __name__ == "__main__":
    main()
