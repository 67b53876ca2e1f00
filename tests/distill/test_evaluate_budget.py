"""evaluate's speed measurements keep to a small, bounded time budget.

The clock is faked (``distill.evaluate.time``), and the models advance it by a set amount per forward, so
these tests count forwards and budget arithmetic, never real time.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import distill.evaluate
from distill.evaluate import LATENCY_BUDGET_S, _model_report, evaluate, measure_latency


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedModel(nn.Module):
    """A linear model whose forward "takes" ``durations[i]`` seconds on the fake clock (the last one repeats)."""

    def __init__(self, clock: FakeClock, durations, in_features=4, classes=3):
        super().__init__()
        self.clock, self.durations = clock, list(durations)
        self.linear = nn.Linear(in_features, classes)
        self.calls = 0

    def forward(self, x):
        self.clock.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1
        return self.linear(x)


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(distill.evaluate, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def test_zero_budget_makes_one_warmup_and_three_timed_runs(clock):
    model = TimedModel(clock, [0.5, 0.002, 0.009, 0.004, 1.0])  # warm-up, then three timed forwards
    ms = measure_latency(model, torch.zeros(1, 4), torch.device("cpu"), budget_s=0.0)
    assert model.calls == 4
    assert ms == pytest.approx(4.0)  # the median of 2, 9 and 4 ms; the slow warm-up is not counted


@pytest.mark.parametrize("max_iters,timed", [(1, 1), (2, 2), (5, 5)])
def test_max_iters_caps_timed_runs_even_with_budget_left(clock, max_iters, timed):
    model = TimedModel(clock, [0.001])
    measure_latency(model, torch.zeros(1, 4), torch.device("cpu"), budget_s=100.0, max_iters=max_iters)
    assert model.calls == 3 + timed  # three warm-ups fit in a fifth of a large budget


@pytest.mark.parametrize("budget,step", [(0.05, 0.001), (0.05, 0.0123), (0.2, 0.003), (1.0, 0.01)])
def test_measurement_stays_within_budget_plus_one_forward(clock, budget, step):
    model = TimedModel(clock, [step])
    measure_latency(model, torch.zeros(8, 4), torch.device("cpu"), budget_s=budget)
    assert clock.now <= budget + step + 1e-9
    assert model.calls >= 1 + 3
    assert clock.now >= budget - step  # and it uses the budget rather than stopping early


def test_slow_model_still_gets_three_timed_runs(clock):
    model = TimedModel(clock, [0.3])  # each forward longer than the whole default budget
    measure_latency(model, torch.zeros(1, 4), torch.device("cpu"))
    assert model.calls == 1 + 3


def test_default_budget_is_a_quarter_of_the_report_budget(clock):
    model = TimedModel(clock, [0.0005])
    measure_latency(model, torch.zeros(1, 4), torch.device("cpu"))
    assert LATENCY_BUDGET_S / 4 - 0.0005 <= clock.now <= LATENCY_BUDGET_S / 4 + 0.0005 + 1e-9


def test_model_report_fields_and_budget(clock):
    model = TimedModel(clock, [0.001])
    features = torch.randn(50, 4)
    report = _model_report(model, features, torch.device("cpu"), 0.75, budget_s=0.1)
    assert set(report) == {"accuracy", "parameters", "latency_ms_per_sample", "throughput_samples_per_s"}
    assert report["accuracy"] == 0.75 and report["parameters"] == 4 * 3 + 3
    assert report["latency_ms_per_sample"] == pytest.approx(1.0)
    assert report["throughput_samples_per_s"] == pytest.approx(50 / 1e-3)
    assert 0.1 - 2 * 0.001 <= clock.now <= 0.1 + 2 * 0.001 + 1e-9


@pytest.mark.parametrize("latency_budget_s", [None, 0.08])
def test_evaluate_report_keeps_its_fields_and_total_budget(clock, monkeypatch, latency_budget_s):
    # logits come without touching the clock, so the clock measures the speed benchmark alone
    monkeypatch.setattr(distill.evaluate, "compute_logits", lambda model, features, device: model.linear(features))
    teacher, student = TimedModel(clock, [0.002]), TimedModel(clock, [0.0007])
    features, labels = torch.randn(64, 4), torch.randint(0, 3, (64,))
    kwargs = {} if latency_budget_s is None else {"latency_budget_s": latency_budget_s}
    report = evaluate(teacher, student, features, labels, torch.device("cpu"), **kwargs)
    assert set(report) == {"validation_rows", "device", "teacher", "student", "agreement", "kl_teacher_student",
                           "parameter_ratio", "speedup", "accuracy_retention"}
    for side in ("teacher", "student"):
        assert set(report[side]) == {"accuracy", "parameters", "latency_ms_per_sample", "throughput_samples_per_s"}
    assert report["speedup"] == pytest.approx(2.0 / 0.7)
    budget = LATENCY_BUDGET_S if latency_budget_s is None else latency_budget_s
    assert clock.now <= budget + 2 * (0.002 + 0.0007) + 1e-9  # one forward of overshoot per measurement
    assert clock.now >= budget - 2 * (0.002 + 0.0007)
    assert teacher.calls >= 2 * 4 and student.calls >= 2 * 4
