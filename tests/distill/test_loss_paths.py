"""Every path of the LM loss (fused, materialized, chunked, checkpointed) equals the reference —
full logits through token_divergence and cross_entropy, plain autograd — in value and gradient
(hidden states and every head parameter), for each teacher form and divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import LOSS_PATHS, lm_loss, teacher_topk, token_divergence
from distill.losses.chunked import choose_path

PATHS = [p for p in LOSS_PATHS if p != "auto"]
N, H, V_ROWS, SHARED = 37, 12, 50, 45  # padded head: rows past SHARED never count


def _models(head_kind: str):
    torch.manual_seed(0)
    if head_kind == "linear":
        student = nn.Linear(H, V_ROWS, bias=False)
    elif head_kind == "linear_bias":
        student = nn.Linear(H, V_ROWS)
    else:  # a head that is not a plain Linear: the fused path's generic branch
        student = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, V_ROWS))
    teacher = nn.Linear(H, V_ROWS)
    return student.double(), teacher.double()


def _teacher(form: str, teacher_head: nn.Module, teacher_hidden: torch.Tensor, temperature: float):
    with torch.no_grad():
        logits = teacher_head(teacher_hidden)[:, :SHARED]
    if form == "online":
        return (teacher_head, teacher_hidden), logits
    if form == "logits":
        return logits.clone(), logits
    if form == "topk":
        signal = teacher_topk(logits, 8, temperature)
        return signal, signal
    return None, None


def _reference(head, hidden, targets, teacher_ref, loss_type, temperature, beta, kd_w, ce_w):
    logits = head(hidden)[:, :SHARED]
    kd = token_divergence(logits, teacher_ref, loss_type, temperature, beta).sum() if teacher_ref is not None \
        else logits.new_zeros(())
    ce = F.cross_entropy(logits, targets, reduction="sum")
    return kd_w * kd + ce_w * ce, kd, ce


def _grads(total, hidden, head):
    params = [p for p in head.parameters()]
    return torch.autograd.grad(total, [hidden, *params])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["online", "logits", "topk", "none"])
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_path_equals_the_reference(path, form, loss_type, temperature):
    student, teacher_head = _models("linear_bias" if form == "online" else "linear")
    torch.manual_seed(1)
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, H, dtype=torch.float64)
    targets = torch.randint(0, SHARED, (N,))
    beta, kd_w, ce_w = 0.3, 0.7 * temperature**2, 0.3
    teacher, teacher_ref = _teacher(form, teacher_head, teacher_hidden, temperature)

    ref_total, ref_kd, ref_ce = _reference(student, hidden, targets, teacher_ref, loss_type, temperature, beta,
                                           kd_w, ce_w)
    ref_grads = _grads(ref_total, hidden, student)

    out = lm_loss(student, hidden, targets, teacher, SHARED, loss_type, temperature, beta, kd_w, ce_w,
                  path=path, chunk=10)  # 4 chunks, the last one short
    assert out.path == path
    torch.testing.assert_close(out.total, ref_total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.kd, ref_kd.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.ce, ref_ce.detach(), rtol=1e-10, atol=1e-10)
    grads = _grads(out.total, hidden, student)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert grads[1][SHARED:].abs().max() == 0  # padded head rows get no gradient


@pytest.mark.parametrize("path", PATHS)
def test_generic_head_and_upstream_graph(path):
    """A head that is not a plain Linear, hidden states that come from a layer below (the gradient must
    flow on), a loss scaled after the fact (the loop divides by the count and by accumulation)."""
    student, teacher_head = _models("sequential")
    body = nn.Linear(H, H).double()
    torch.manual_seed(2)
    x = torch.randn(N, H, dtype=torch.float64)
    teacher_hidden = torch.randn(N, H, dtype=torch.float64)
    targets = torch.randint(0, SHARED, (N,))
    teacher, teacher_ref = _teacher("online", teacher_head, teacher_hidden, 1.0)

    params = [*body.parameters(), *student.parameters()]
    ref_total, _, _ = _reference(student, body(x), targets, teacher_ref, "forward_kl", 1.0, 0.5, 0.5, 0.5)
    ref = torch.autograd.grad(ref_total / 7, params)
    out = lm_loss(student, body(x), targets, teacher, SHARED, "forward_kl", 1.0, 0.5, 0.5, 0.5, path=path, chunk=8)
    got = torch.autograd.grad(out.total / 7, params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_tied_weights_accumulate_both_gradients():
    """GPT-2 style: the head's weight is the input embedding; both uses must add up in .grad."""
    torch.manual_seed(3)
    embedding = nn.Embedding(V_ROWS, H).double()
    head = nn.Linear(H, V_ROWS, bias=False).double()
    head.weight = embedding.weight
    ids = torch.randint(0, SHARED, (N,))
    teacher_logits = torch.randn(N, SHARED, dtype=torch.float64)
    grads = {}
    for path in ("materialized", "fused"):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(ids))
        lm_loss(head, hidden, ids.roll(1), teacher_logits, SHARED, "forward_kl", 1.0, 0.5, 0.5, 0.5,
                path=path).total.backward()
        grads[path] = embedding.weight.grad.clone()
    torch.testing.assert_close(grads["fused"], grads["materialized"], rtol=1e-9, atol=1e-10)


def test_frozen_head_and_float32():
    """A frozen head (LoRA students) gets no gradient and costs none; float32 inputs agree with float64
    closely; an empty selection gives an exact 0 that can still backward."""
    student, _ = _models("linear")
    student = student.float().requires_grad_(False)
    torch.manual_seed(4)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, SHARED, (N,))
    teacher = torch.randn(N, SHARED)
    out = lm_loss(student, hidden, targets, teacher, SHARED, "forward_kl", 1.0, 0.5, 1.0, 1.0, path="fused")
    ref = lm_loss(student, hidden, targets, teacher, SHARED, "forward_kl", 1.0, 0.5, 1.0, 1.0, path="materialized")
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.total, hidden)
    (r,) = torch.autograd.grad(ref.total, hidden)
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert student.weight.grad is None

    empty = hidden[:0]
    out = lm_loss(student, empty, targets[:0], teacher[:0], SHARED, "forward_kl", 1.0, 0.5, 1.0, 1.0, path="fused")
    assert out.total.item() == 0.0
    out.total.backward()
    assert hidden.grad is not None and hidden.grad.abs().max() == 0


def test_auto_picks_fused_for_training_and_chunked_without_grad():
    hidden = torch.randn(4, H, requires_grad=True)
    assert choose_path("auto", hidden) == "fused"
    with torch.no_grad():
        assert choose_path("auto", hidden) == "chunked"
    assert choose_path("checkpointed", hidden) == "checkpointed"
    with pytest.raises(ValueError, match="loss path"):
        choose_path("fastest", hidden)


@pytest.mark.parametrize("form", ["logits", "topk"])
def test_fused_under_bf16_autocast_matches_materialized(form):
    """The loop trains under bf16 autocast on GPUs; CPU autocast runs the same code path. Both paths then
    compute the logits in bf16 and the loss in float32; they must agree to bf16 precision."""
    student, teacher_head = _models("linear")
    student = student.float()
    torch.manual_seed(5)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, SHARED, (N,))
    teacher, _ = _teacher(form, teacher_head.float(), torch.randn(N, H), 1.0)
    results = {}
    for path in ("materialized", "fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_loss(student, hidden, targets, teacher, SHARED, "forward_kl", 1.0, 0.0, 0.5, 0.5, path=path)
        assert out.total.dtype == torch.float32
        results[path] = (out.total.detach(), *torch.autograd.grad(out.total, [hidden, student.weight]))
    for got, want in zip(results["fused"], results["materialized"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_jsd_at_beta_zero_is_forward_kl_on_the_fused_path():
    student, teacher_head = _models("linear")
    torch.manual_seed(6)
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, SHARED, (N,))
    teacher, _ = _teacher("logits", teacher_head, torch.randn(N, H, dtype=torch.float64), 1.0)
    jsd = lm_loss(student, hidden, targets, teacher, SHARED, "jsd", 1.0, 0.0, 1.0, 0.0, path="fused").total
    ref = lm_loss(student, hidden, targets, teacher, SHARED, "forward_kl", 1.0, 0.0, 1.0, 0.0, path="materialized").total
    torch.testing.assert_close(jsd, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(jsd, hidden)[0], torch.autograd.grad(ref, hidden)[0],
                               rtol=1e-9, atol=1e-10)
