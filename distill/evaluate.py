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

__all__ = ["evaluate", "measure_latency", "classification_metrics"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, sample: torch.Tensor, device: torch.device, budget_s: float = 0.25,
                    max_iters: int = 500) -> float:
    """Median wall time of one forward of ``sample`` (a batch), in milliseconds."""
    model.eval()
    sample = sample.to(device)
    for _ in range(5):  # warm-up: allocator, kernels, caches
        model(sample)
    _sync(device)
    timings: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(timings) < max_iters and (len(timings) < 10 or time.perf_counter() < deadline):
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


def _model_report(model: nn.Module, features: torch.Tensor, device: torch.device, accuracy: float | None) -> dict:
    single = features[:1]
    batch = features[: min(len(features), 1024)]
    batch_ms = measure_latency(model, batch, device)
    return {
        "accuracy": accuracy,
        "parameters": count_parameters(model),
        "latency_ms_per_sample": measure_latency(model, single, device),  # batch of one: what an online caller sees
        "throughput_samples_per_s": len(batch) / (batch_ms / 1e3),
    }


def evaluate(teacher: nn.Module, student: nn.Module, features: torch.Tensor, labels: torch.Tensor | None,
             device: torch.device, teacher_logits: torch.Tensor | None = None) -> dict:
    """Compare teacher and student on a validation set (features (N, D), labels (N,) or None)."""
    if teacher_logits is None:
        teacher_logits = compute_logits(teacher, features, device)
    student_logits = compute_logits(student, features, device)
    metrics = classification_metrics(student_logits, teacher_logits, labels)
    report = {
        "validation_rows": len(features),
        "device": str(device),
        "teacher": _model_report(teacher, features, device, metrics["teacher_accuracy"]),
        "student": _model_report(student, features, device, metrics["student_accuracy"]),
        "agreement": metrics["agreement"],
        "kl_teacher_student": metrics["kl_teacher_student"],
    }
    report["parameter_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
    report["speedup"] = report["teacher"]["latency_ms_per_sample"] / report["student"]["latency_ms_per_sample"]
    t_acc, s_acc = metrics["teacher_accuracy"], metrics["student_accuracy"]
    report["accuracy_retention"] = s_acc / t_acc if t_acc else None
    return report
