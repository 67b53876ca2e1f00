import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import distillation_loss, forward_kl

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0]


def _logits(n=16, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale


def _log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    m = z.max(-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def _hand_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """sum_c p_t * (log p_t - log p_s), averaged over rows, times T^2 — written out in float64."""
    log_p_s = _log_softmax_by_hand(s.double() / T)
    log_p_t = _log_softmax_by_hand(t.double() / T)
    per_row = (torch.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1)
    return per_row.mean().item() * T**2


@pytest.mark.parametrize("T", TEMPERATURES)
def test_forward_kl_matches_kldivloss_batchmean(T):
    s, t = _logits(seed=int(T * 10))
    expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2
    got = forward_kl(s, t, T)
    assert got.shape == ()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_forward_kl_matches_hand_formula(T):
    s, t = _logits(n=9, c=4, seed=100 + int(T * 10))
    assert forward_kl(s, t, T).item() == pytest.approx(_hand_kl(s, t, T), rel=1e-4, abs=1e-6)


def test_forward_kl_is_scaled_by_t_squared():
    # With the same softened distributions (logits scaled along with T), the loss scales by T^2.
    s, t = _logits(seed=3)
    base = forward_kl(s, t, 1.0).item()
    assert base > 0
    for T in (2.0, 5.0):
        assert forward_kl(s * T, t * T, T).item() == pytest.approx(base * T**2, rel=1e-4)


def test_forward_kl_averages_over_rows_not_elements():
    s, t = _logits(n=8, c=6, seed=4)
    one = forward_kl(s[:1], t[:1], 2.0)
    repeated = forward_kl(s[:1].repeat(8, 1), t[:1].repeat(8, 1), 2.0)
    torch.testing.assert_close(one, repeated)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_forward_kl_equal_logits_is_zero(T):
    s, _ = _logits(seed=5)
    assert abs(forward_kl(s, s.clone(), T).item()) < 1e-5
    # ... and shifting the teacher's logits by a per-row constant changes nothing
    assert abs(forward_kl(s, s + 7.0, T).item()) < 1e-4


def test_forward_kl_is_positive_for_different_distributions():
    s, t = _logits(seed=6)
    for T in TEMPERATURES:
        assert forward_kl(s, t, T).item() > 0


def test_forward_kl_empty_batch_is_zero_not_nan():
    s = torch.empty(0, 5, requires_grad=True)
    t = torch.empty(0, 5)
    loss = forward_kl(s, t, 2.0)
    assert not torch.isnan(loss)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable
    assert s.grad is not None and s.grad.shape == (0, 5)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_distillation_loss_with_labels_mixes_kl_and_ce(alpha, T):
    s, t = _logits(n=12, c=4, seed=7)
    labels = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(8))
    expected = alpha * forward_kl(s, t, T) + (1 - alpha) * F.cross_entropy(s, labels)
    torch.testing.assert_close(distillation_loss(s, t, labels, T, alpha), expected)


def test_distillation_loss_alpha_one_is_pure_kl_alpha_zero_pure_ce():
    s, t = _logits(n=12, c=4, seed=9)
    labels = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(distillation_loss(s, t, labels, 2.0, 1.0), forward_kl(s, t, 2.0))
    torch.testing.assert_close(distillation_loss(s, t, labels, 2.0, 0.0), F.cross_entropy(s, labels))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_distillation_loss_without_labels_is_pure_kl(alpha):
    s, t = _logits(seed=11)
    torch.testing.assert_close(distillation_loss(s, t, None, 3.0, alpha), forward_kl(s, t, 3.0))


def test_unknown_soft_loss_is_refused():
    s, t = _logits(seed=12)
    with pytest.raises(ValueError):
        distillation_loss(s, t, None, 1.0, 0.5, soft_loss="no_such_loss")


def test_gradient_flows_to_student_logits_only():
    T = 2.0
    teacher = torch.nn.Linear(3, 4)
    student = torch.nn.Linear(3, 4)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():  # as the engine computes its soft targets
        teacher_logits = teacher(x)
    student_logits = student(x)
    student_logits.retain_grad()
    labels = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(14))
    distillation_loss(student_logits, teacher_logits, labels, T, 0.5).backward()

    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert not teacher_logits.requires_grad and teacher_logits.grad is None
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert student_logits.grad is not None

    # d/ds [T^2 * mean_rows KL(p_t || softmax(s/T))] = T * (softmax(s/T) - p_t) / N; CE adds (softmax(s) - onehot)/N
    n = x.shape[0]
    s = student_logits.detach()
    expected = 0.5 * T * (F.softmax(s / T, -1) - F.softmax(teacher_logits / T, -1)) / n
    expected += 0.5 * (F.softmax(s, -1) - F.one_hot(labels, 4).float()) / n
    torch.testing.assert_close(student_logits.grad, expected)
    assert math.isfinite(student_logits.grad.abs().sum().item())
