"""Evaluate and compare (the seed's fourth step): accuracy of teacher and student,
how often they agree, how far apart their distributions are, how big and how fast each is."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .models import count_parameters
from .teacher_signal import compute_logits

__all__ = ["evaluate", "measure_latency", "classification_metrics", "LATENCY_BUDGET_S"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Wall-clock budget for all the latency/throughput timing of one ``evaluate`` report: 2 models x 2
# measurements (a batch of one, a batch of up to 1024), each given a quarter, warm-ups included.
LATENCY_BUDGET_S = 0.2
MEASUREMENTS_PER_REPORT = 4
MIN_TIMED_RUNS = 3  # the median is taken over at least this many timed forwards (max_iters permitting)
MAX_WARMUP_RUNS = 3


@torch.no_grad()
def measure_latency(model: nn.Module, sample: torch.Tensor, device: torch.device,
                    budget_s: float = LATENCY_BUDGET_S / MEASUREMENTS_PER_REPORT, max_iters: int = 500,
                    min_iters: int = MIN_TIMED_RUNS) -> float:
    """Median wall time of one forward of ``sample`` (a batch), in milliseconds.

    ``budget_s`` bounds the whole measurement, warm-up included: one warm-up forward always, up to
    MAX_WARMUP_RUNS while within a fifth of the budget; then timed forwards until the budget is spent, at
    least ``min_iters`` of them and never more than ``max_iters``. So it takes about
    max(budget_s, (1 + min_iters) forwards), plus at most one forward of overshoot.
    """
    begin = time.perf_counter()
    deadline = begin + budget_s
    warmup_deadline = begin + budget_s / 5
    max_iters = max(1, max_iters)
    min_iters = max(1, min(min_iters, max_iters))
    model.eval()
    sample = sample.to(device)
    for _ in range(MAX_WARMUP_RUNS):  # warm-up: allocator, kernels, caches
        model(sample)
        _sync(device)
        if time.perf_counter() >= warmup_deadline:
            break
    timings: list[float] = []
    while len(timings) < max_iters and (len(timings) < min_iters or time.perf_counter() < deadline):
        start = time.perf_counter()
        model(sample)
        _sync(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def classification_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor | None) -> dict:
    """Agreement, mean KL(teacher‖student) at T=1 and, with labels, accuracy of each. Logits (N, C)."""
    student_pred = student_logits.argmax(-1)
    teacher_pred = teacher_logits.argmax(-1)
    kl = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                  reduction="batchmean")
    metrics = {
        "agreement": (student_pred == teacher_pred).float().mean().item(),
        "kl_teacher_student": kl.item(),
        "student_accuracy": None,
        "teacher_accuracy": None,
    }
    if labels is not None:
        labels = labels.to(student_pred.device)
        metrics["student_accuracy"] = (student_pred == labels).float().mean().item()
        metrics["teacher_accuracy"] = (teacher_pred == labels).float().mean().item()
    return metrics


def _model_report(model: nn.Module, features: torch.Tensor, device: torch.device, accuracy: float | None,
                  budget_s: float | None = None) -> dict:
    """Accuracy, size and speed of one model. ``budget_s`` (split between its two timings) defaults to
    measure_latency's own default per timing, i.e. half of LATENCY_BUDGET_S for the model."""
    single = features[:1]
    batch = features[: min(len(features), 1024)]
    timing = {} if budget_s is None else {"budget_s": budget_s / 2}
    batch_ms = measure_latency(model, batch, device, **timing)
    return {
        "accuracy": accuracy,
        "parameters": count_parameters(model),
        # batch of one: what an online caller sees
        "latency_ms_per_sample": measure_latency(model, single, device, **timing),
        "throughput_samples_per_s": len(batch) / (batch_ms / 1e3),
    }


def evaluate(teacher: nn.Module, student: nn.Module, features: torch.Tensor, labels: torch.Tensor | None,
             device: torch.device, teacher_logits: torch.Tensor | None = None,
             latency_budget_s: float | None = None) -> dict:
    """Compare teacher and student on a validation set (features (N, D), labels (N,) or None).

    The speed measurements take about ``latency_budget_s`` in all (LATENCY_BUDGET_S by default), more only
    for models so slow that the minimum number of forwards outlasts it."""
    model_budget = None if latency_budget_s is None else latency_budget_s / 2
    if teacher_logits is None:
        teacher_logits = compute_logits(teacher, features, device)
    student_logits = compute_logits(student, features, device)
    metrics = classification_metrics(student_logits, teacher_logits, labels)
    report = {
        "validation_rows": len(features),
        "device": str(device),
        "teacher": _model_report(teacher, features, device, metrics["teacher_accuracy"], model_budget),
        "student": _model_report(student, features, device, metrics["student_accuracy"], model_budget),
        "agreement": metrics["agreement"],
        "kl_teacher_student": metrics["kl_teacher_student"],
    }
    report["parameter_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
    report["speedup"] = report["teacher"]["latency_ms_per_sample"] / report["student"]["latency_ms_per_sample"]
    t_acc, s_acc = metrics["teacher_accuracy"], metrics["student_accuracy"]
    report["accuracy_retention"] = s_acc / t_acc if t_acc else None
    return report
