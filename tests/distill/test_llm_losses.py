"""Token-level LLM distillation losses (distill.losses.token) against formulas written out by hand.

The references below use only elementwise torch ops in float64 (exp, log, sum, abs), no
log_softmax / kl_div / logsumexp, so they check the module rather than restate it.
"""

import math

import pytest
import torch

from distill.losses.token import LOSS_TYPES, TAIL_EPS, TopKSignal, teacher_topk, token_divergence, token_kd_loss

TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
# (loss_type, beta) pairs covering every divergence, jsd at both special-cased ends and inside
ALL_LOSSES = [
    ("forward_kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.3),
]


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _pair(n=10, v=13, seed=0, scale=3.0):
    return _logits(n, v, seed=seed, scale=scale), _logits(n, v, seed=seed + 1000, scale=scale)


def _mask(*shape, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < p
    m.view(-1)[0] = True  # at least one real position
    return m


# --------------------------------------------------------------------------- hand-written references


def _probs(z, T):
    """softmax(z / T) in float64, by hand."""
    z = z.double() / T
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _ref_from_probs(p, q, loss_type, beta):
    """The divergence between two distributions over the last dim, per row (float64)."""

    def kl(a, b):  # sum a log(a/b), with 0 log 0 = 0
        return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a)).sum(-1)

    if loss_type == "forward_kl":
        return kl(p, q)
    if loss_type == "reverse_kl":
        return kl(q, p)
    if loss_type == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    assert loss_type == "jsd"
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _ref_full(s, t, loss_type, T, beta):
    return _ref_from_probs(_probs(t, T), _probs(s, T), loss_type, beta)


def _ref_topk(s, t, k, loss_type, T, beta):
    """Top-k + one tail bucket, from scratch: teacher's k largest probabilities and their
    ids, 1 - sum for the tail; the student's probabilities at those ids, 1 - sum for its tail."""
    p = _probs(t, T)
    p_top, ids = p.sort(-1, descending=True)
    p_top, ids = p_top[..., :k], ids[..., :k]
    q_top = _probs(s, T).gather(-1, ids)
    p_tail = (1 - p_top.sum(-1, keepdim=True)).clamp_min(TAIL_EPS)
    q_tail = (1 - q_top.sum(-1, keepdim=True)).clamp_min(TAIL_EPS)
    return _ref_from_probs(torch.cat([p_top, p_tail], -1), torch.cat([q_top, q_tail], -1), loss_type, beta)


def _close(actual, expected, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _student_grad(student, teacher, mask, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = token_kd_loss(s, teacher, mask, **kw)
    loss.backward()
    return loss.detach(), s.grad


# --------------------------------------------------------------------------- each divergence vs its formula


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "tvd"])
def test_divergence_matches_hand_formula(loss_type, T):
    s, t = _pair(seed=int(T * 10))
    got = token_divergence(s, t, loss_type, temperature=T)
    assert got.shape == (10,) and got.dtype == torch.float32
    _close(got, _ref_full(s, t, loss_type, T, None))
    assert (got > 0).all()


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_hand_formula(beta, T):
    s, t = _pair(seed=7 + int(T * 10))
    got = token_divergence(s, t, "jsd", temperature=T, beta=beta)
    _close(got, _ref_full(s, t, "jsd", T, beta))
    assert (got > 0).all()


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
def test_topk_divergence_matches_hand_bucket_formula(loss_type, beta, T):
    s, t = _pair(n=8, v=17, seed=3, scale=2.0)
    for k in (1, 4, 8):
        sig = teacher_topk(t, k, T)
        # Tails well above float32 resolution: a teacher tail below ~1e-7 cannot be resolved
        # from float32 log-probabilities (1 - sum p_i is rounding noise there), so the
        # float64 reference would disagree with any float32 signal, this module's included.
        assert (1 - sig.logprobs.exp().sum(-1)).min() > 1e-3
        got = token_divergence(s, sig, loss_type, temperature=T, beta=beta)
        _close(got, _ref_topk(s, t, k, loss_type, T, beta))


@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
def test_kd_loss_is_t_squared_times_mean_over_masked_positions(loss_type, beta):
    s, t = _logits(3, 5, 11, seed=20), _logits(3, 5, 11, seed=21)
    mask = _mask(3, 5, seed=22)
    for T in (0.5, 2.0):
        expected = _ref_full(s, t, loss_type, T, beta)[mask].mean() * T**2
        got = token_kd_loss(s, t, mask, loss_type, temperature=T, beta=beta)
        assert got.shape == () and got.dtype == torch.float32
        _close(got, expected)
    # ... and the same through a top-k signal (tails resolvable in float32, see above)
    s, t = s / 2, t / 2
    for T in (1.0, 2.0):
        sig = teacher_topk(t, 4, T)
        assert (1 - sig.logprobs.exp().sum(-1)).min() > 1e-3
        expected_k = _ref_topk(s, t, 4, loss_type, T, beta)[mask].mean() * T**2
        _close(token_kd_loss(s, sig, mask, loss_type, temperature=T, beta=beta), expected_k)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = _pair(seed=30)
    for T in (1.0, 2.5):
        torch.testing.assert_close(token_divergence(s, t, "jsd", T, beta=0.0), token_divergence(s, t, "forward_kl", T))
        torch.testing.assert_close(token_divergence(s, t, "jsd", T, beta=1.0), token_divergence(s, t, "reverse_kl", T))
        # the endpoints are special cases: the mixed formula is much smaller near them (~beta * KL)
        near = token_divergence(s, t, "jsd", T, beta=1e-3)
        assert (near < 0.01 * token_divergence(s, t, "forward_kl", T)).all()


def test_gradient_of_forward_kl_is_t_times_q_minus_p_over_n():
    T, n = 2.0, 10
    s, t = _pair(n=n, seed=31)
    mask = torch.ones(n, dtype=torch.bool)
    _, grad = _student_grad(s, t, mask, temperature=T)
    _close(grad, T * (_probs(s, T) - _probs(t, T)) / n, atol=1e-7)


def test_float64_gradcheck_full_topk_and_chunked():
    s, t = _logits(2, 3, 6, seed=32, dtype=torch.float64), _logits(2, 3, 6, seed=33, dtype=torch.float64)
    s.requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    sig = teacher_topk(t, 3, 1.5)
    assert sig.logprobs.dtype == torch.float64
    for loss_type, beta in ALL_LOSSES:
        for teacher, chunk in ((t, None), (sig, None), (t, 3), (sig, 2)):
            fn = lambda x: token_kd_loss(x, teacher, mask, loss_type, 1.5, beta, chunk_size=chunk)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (s,)), (loss_type, beta, chunk)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
def test_equal_logits_give_zero(loss_type, beta):
    s, _ = _pair(seed=40)
    for T in (0.5, 1.0, 4.0):
        full = token_divergence(s, s.clone(), loss_type, T, beta)
        assert full.abs().max() < 1e-5
        shifted = token_divergence(s, s + 5.0, loss_type, T, beta)  # per-row constant: same distribution
        assert shifted.abs().max() < 1e-5
        topk = token_divergence(s, teacher_topk(s, 4, T), loss_type, T, beta)
        assert topk.abs().max() < 1e-5


@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
def test_topk_with_k_equal_vocab_equals_full(loss_type, beta):
    s, t = _logits(2, 6, 19, seed=41), _logits(2, 6, 19, seed=42)
    mask = _mask(2, 6, seed=43)
    for T in (0.7, 2.0):
        sig = teacher_topk(t, 19, T)
        div_k = token_divergence(s, sig, loss_type, T, beta)
        div_full = token_divergence(s, t, loss_type, T, beta)
        assert torch.isfinite(div_k).all()
        torch.testing.assert_close(div_k, div_full, rtol=1e-5, atol=1e-6)
        loss_k, grad_k = _student_grad(s, sig, mask, loss_type=loss_type, temperature=T, beta=beta)
        loss_full, grad_full = _student_grad(s, t, mask, loss_type=loss_type, temperature=T, beta=beta)
        torch.testing.assert_close(loss_k, loss_full, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(grad_k).all()
        torch.testing.assert_close(grad_k, grad_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
def test_small_k_is_finite_and_differs_from_full(loss_type, beta):
    s, t = _pair(n=12, v=40, seed=44, scale=1.0)  # flat-ish teacher: a real tail beyond k=3
    mask = torch.ones(12, dtype=torch.bool)
    sig = teacher_topk(t, 3, 1.0)
    assert (sig.logprobs.exp().sum(-1) < 0.9).all()
    loss_k, grad_k = _student_grad(s, sig, mask, loss_type=loss_type, beta=beta)
    loss_full, _ = _student_grad(s, t, mask, loss_type=loss_type, beta=beta)
    assert math.isfinite(loss_k.item()) and torch.isfinite(grad_k).all() and grad_k.abs().sum() > 0
    assert loss_k.item() > 0
    assert abs(loss_k.item() - loss_full.item()) > 1e-3


def test_topk_tail_bucket_only_sees_total_tail_mass():
    # Moving student mass between tail tokens (ids outside the teacher's top-k) changes nothing.
    s, t = _pair(n=4, v=10, seed=45)
    sig = teacher_topk(t, 3, 1.0)
    tail_ids = [sorted(set(range(10)) - set(row.tolist())) for row in sig.indices]
    s2 = s.clone()
    for r, ids in enumerate(tail_ids):
        s2[r, ids] = s[r, ids].flip(0)  # permute the tail logits: same total tail mass
    for loss_type, beta in ALL_LOSSES:
        torch.testing.assert_close(
            token_divergence(s2, sig, loss_type, 1.0, beta), token_divergence(s, sig, loss_type, 1.0, beta)
        )
    assert not torch.equal(s, s2)


def test_topk_student_tail_is_accurate_when_tiny():
    # A confident student (tail mass ~1e-7) vs a teacher with a 10% tail: 1 - sum(q_top) in
    # float32 would be rounding noise; the module sums the tail directly.
    v = 50
    t = torch.zeros(1, v)
    t[0, 0] = math.log(9 * (v - 1))  # p_0 = 0.9, the other 49 share 0.1
    s = torch.full((1, v), -20.0)
    s[0, 0] = 0.0
    sig = teacher_topk(t, 1, 1.0)
    got = token_divergence(s, sig, "forward_kl")
    p_tail, q_top = 0.1, 1 / (1 + (v - 1) * math.exp(-20.0))
    q_tail = 1 - q_top
    expected = 0.9 * math.log(0.9 / q_top) + p_tail * math.log(p_tail / q_tail)
    assert got.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("teacher_kind", ["logits", "topk"])
@pytest.mark.parametrize("loss_type,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("tvd", 0.5)])
def test_chunked_equals_unchunked(loss_type, beta, teacher_kind):
    s, t = _logits(3, 7, 23, seed=50), _logits(3, 7, 23, seed=51)
    mask = _mask(3, 7, seed=52, p=0.8)
    n = int(mask.sum())
    teacher = t if teacher_kind == "logits" else teacher_topk(t, 5, 2.0)
    ref_loss, ref_grad = _student_grad(s, teacher, mask, loss_type=loss_type, temperature=2.0, beta=beta)
    assert n > 8 and ref_grad.abs().sum() > 0
    for chunk in (1, 3, 4, n - 1, n, n + 5):  # 3 and 4 don't divide n
        loss, grad = _student_grad(s, teacher, mask, loss_type=loss_type, temperature=2.0, beta=beta, chunk_size=chunk)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), chunk
        assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7), chunk


def test_chunking_recomputes_under_checkpoint(monkeypatch):
    import distill.losses.chunked as mod  # the one chunked implementation token_kd_loss uses

    calls = []
    original = mod._chunk_loss
    monkeypatch.setattr(mod, "_chunk_loss", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    s, t = _pair(n=10, seed=53)
    _student_grad(s, t, torch.ones(10, dtype=torch.bool), chunk_size=4)
    assert calls == [4, 4, 2, 2, 4, 4]  # forward 3 chunks, then backward recomputes each (last first)


@pytest.mark.parametrize("loss_type,beta", ALL_LOSSES)
@pytest.mark.parametrize("chunk", [None, 2])
def test_masked_positions_never_count(loss_type, beta, chunk):
    s, t = _logits(2, 5, 9, seed=60), _logits(2, 5, 9, seed=61)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = _logits(int((~mask).sum()), 9, seed=62, scale=50.0)
    t2[~mask] = _logits(int((~mask).sum()), 9, seed=63, scale=50.0)
    kw = dict(loss_type=loss_type, temperature=1.5, beta=beta, chunk_size=chunk)
    loss, grad = _student_grad(s, t, mask, **kw)
    loss2, grad2 = _student_grad(s2, t2, mask, **kw)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert torch.count_nonzero(grad[~mask]) == 0 and torch.count_nonzero(grad[mask]) > 0
    # the same with a top-k signal made from the changed teacher
    loss3, grad3 = _student_grad(s2, teacher_topk(t2, 3, 1.5), mask, **kw)
    loss4, _ = _student_grad(s, teacher_topk(t, 3, 1.5), mask, **kw)
    torch.testing.assert_close(loss3, loss4)
    assert torch.count_nonzero(grad3[~mask]) == 0


def test_masked_positions_with_inf_or_nan_logits_do_not_leak():
    s, t = _logits(2, 4, 7, seed=64), _logits(2, 4, 7, seed=65)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    s2 = s.clone()
    s2[~mask] = float("nan")
    loss, grad = _student_grad(s, t, mask)
    loss2, grad2 = _student_grad(s2, t, mask)
    torch.testing.assert_close(loss2, loss)
    assert torch.isfinite(grad2).all() and torch.count_nonzero(grad2[~mask]) == 0


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("teacher_kind", ["logits", "topk"])
def test_all_masked_is_exactly_zero_and_backward_works(teacher_kind, chunk):
    s, t = _logits(2, 4, 9, seed=70), _logits(2, 4, 9, seed=71)
    teacher = t if teacher_kind == "logits" else teacher_topk(t, 3, 2.0)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for loss_type, beta in ALL_LOSSES:
        x = s.clone().requires_grad_(True)
        loss = token_kd_loss(x, teacher, mask, loss_type, temperature=2.0, beta=beta, chunk_size=chunk)
        assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.grad_fn is not None
        loss.backward()
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    # even when the (all-masked) logits hold inf / NaN
    x = torch.full((2, 4, 9), float("inf"), requires_grad=True)
    loss = token_kd_loss(x, teacher, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_t_squared_scaling():
    s, t = _pair(seed=80)
    mask = torch.ones(10, dtype=torch.bool)
    for loss_type, beta in ALL_LOSSES:
        base = token_kd_loss(s, t, mask, loss_type, 1.0, beta).item()
        assert base > 0
        for T in (2.0, 5.0):
            # logits scaled along with T: the same softened distributions, so only T^2 differs
            scaled = token_kd_loss(s * T, t * T, mask, loss_type, T, beta).item()
            assert scaled == pytest.approx(base * T**2, rel=1e-4)
            direct = token_divergence(s, t, loss_type, T, beta).mean().item() * T**2
            assert token_kd_loss(s, t, mask, loss_type, T, beta).item() == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_no_gradient_reaches_the_teacher(chunk):
    s, t = _logits(2, 4, 9, seed=90), _logits(2, 4, 9, seed=91)
    mask = _mask(2, 4, seed=92)
    for loss_type, beta in ALL_LOSSES:
        teacher_logits = t.clone().requires_grad_(True)
        student = s.clone().requires_grad_(True)
        token_kd_loss(student, teacher_logits, mask, loss_type, 2.0, beta, chunk_size=chunk).backward()
        assert teacher_logits.grad is None and student.grad.abs().sum() > 0
        # a top-k signal whose logprobs carry a graph: still detached
        logprobs = teacher_topk(t, 3, 2.0).logprobs.clone().requires_grad_(True)
        sig = TopKSignal(logprobs, teacher_topk(t, 3, 2.0).indices)
        token_kd_loss(s.clone().requires_grad_(True), sig, mask, loss_type, 2.0, beta, chunk_size=chunk).backward()
        assert logprobs.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 4])
def test_half_precision_student_logits(dtype, chunk):
    s, t = _logits(2, 5, 64, seed=100, dtype=dtype), _logits(2, 5, 64, seed=101)
    mask = _mask(2, 5, seed=102)
    for loss_type, beta in ALL_LOSSES:
        for teacher in (t.to(dtype), teacher_topk(t, 8, 2.0)):
            x = s.clone().requires_grad_(True)
            loss = token_kd_loss(x, teacher, mask, loss_type, 2.0, beta, chunk_size=chunk)
            assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and loss.item() > 0
            loss.backward()
            assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
            # computed in float32 from the (rounded) half-precision values
            ref_teacher = teacher.float() if isinstance(teacher, torch.Tensor) else teacher
            ref = token_kd_loss(s.float(), ref_teacher, mask, loss_type, 2.0, beta)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_teacher_with_minus_inf_logits_is_finite():
    # e.g. a teacher that masks padded vocabulary entries: probability exactly 0 there.
    s, t = _pair(n=6, v=12, seed=110)
    t[:, -3:] = float("-inf")
    mask = torch.ones(6, dtype=torch.bool)
    for loss_type, beta in ALL_LOSSES:
        for teacher in (t, teacher_topk(t, 12, 1.0), teacher_topk(t, 4, 1.0)):
            loss, grad = _student_grad(s, teacher, mask, loss_type=loss_type, beta=beta)
            assert math.isfinite(loss.item()) and torch.isfinite(grad).all(), (loss_type, beta)
        if loss_type == "forward_kl" or (loss_type == "jsd" and beta < 1):
            _close(token_divergence(s, t, loss_type, 1.0, beta), _ref_full(s, t, loss_type, 1.0, beta))


# --------------------------------------------------------------------------- teacher_topk / TopKSignal


def test_teacher_topk_matches_log_softmax_topk():
    t = _logits(2, 3, 30, seed=120)
    for T in (0.5, 2.0):
        sig = teacher_topk(t, 5, T)
        assert sig.logprobs.shape == (2, 3, 5) and sig.indices.shape == (2, 3, 5) and sig.indices.dtype == torch.int64
        assert sig.logprobs.dtype == torch.float32 and not sig.logprobs.requires_grad
        p = _probs(t, T)
        expected_p, expected_ids = p.sort(-1, descending=True)
        torch.testing.assert_close(sig.indices, expected_ids[..., :5])
        _close(sig.logprobs.exp(), expected_p[..., :5])
        assert (sig.logprobs.exp().sum(-1) < 1).all()  # over the full vocabulary: a tail remains
    # bf16 logits and a graph on the input: float32 out, no graph
    sig = teacher_topk(t.to(torch.bfloat16).requires_grad_(True), 4, 1.0)
    assert sig.logprobs.dtype == torch.float32 and sig.logprobs.grad_fn is None


def test_teacher_topk_float32_tail_and_normaliser_match_float64():
    # Large vocabulary, float32 logits: a peaked teacher (tail ~1e-9), a near-flat one (tail ~1)
    # and a typical one. The tail and the top-k log-probabilities match the float64 log-softmax
    # in relative terms, far below what 1 - sum(p_top) of a float32 softmax could resolve.
    g = torch.Generator().manual_seed(150)
    vocab = 32_000
    peaked = torch.randn(4, vocab, generator=g)
    peaked[:, :8] += 30.0
    flat = torch.randn(4, vocab, generator=g) * 0.01
    typical = torch.randn(4, vocab, generator=g) * 3.0
    for logits in (peaked, flat, typical):
        for T in (1.0, 2.0):
            sig = teacher_topk(logits, 64, T)
            exact = torch.log_softmax(logits.double() / T, -1)
            top = exact.gather(-1, sig.indices)
            torch.testing.assert_close(sig.logprobs.double(), top, rtol=0, atol=2e-6)
            exact_tail = exact.scatter(-1, sig.indices, float("-inf")).logsumexp(-1)  # float64, direct
            # error in log space = relative error of the tail mass (plus float32 rounding of the log)
            torch.testing.assert_close(sig.tail_logprob.double(), exact_tail, rtol=1e-6, atol=1e-6)


def test_topk_signal_indexing_and_validation():
    t = _logits(2, 3, 10, seed=130)
    sig = teacher_topk(t, 4, 1.0)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    sub = sig[mask]
    assert sub.logprobs.shape == (4, 4) and torch.equal(sub.indices, sig.indices[mask])
    assert sig[0, 1:].shape == (2,) and sig.k == 4
    assert sig.to("cpu").indices.device.type == "cpu"
    with pytest.raises(ValueError):
        TopKSignal(sig.logprobs, sig.indices[..., :3])
    with pytest.raises(ValueError):
        TopKSignal(sig.logprobs, sig.logprobs)  # float "ids"
    with pytest.raises(ValueError):
        teacher_topk(t, 11, 1.0)
    with pytest.raises(ValueError):
        teacher_topk(t, 0, 1.0)


# --------------------------------------------------------------------------- bad arguments


def test_invalid_arguments_raise_value_error():
    s, t = _logits(2, 3, 8, seed=140), _logits(2, 3, 8, seed=141)
    mask = torch.ones(2, 3, dtype=torch.bool)
    sig = teacher_topk(t, 2, 1.0)
    for bad in ("kl", "forward-kl", "", None):
        with pytest.raises(ValueError):
            token_kd_loss(s, t, mask, loss_type=bad)
        with pytest.raises(ValueError):
            token_divergence(s[0], t[0], loss_type=bad)
    for bad_beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            token_kd_loss(s, t, mask, "jsd", beta=bad_beta)
        with pytest.raises(ValueError):
            token_divergence(s[0], sig[0], "jsd", beta=bad_beta)
    for bad_t in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            token_kd_loss(s, t, mask, temperature=bad_t)
    bad_calls = [
        lambda: token_kd_loss(s, t, mask.long()),  # not bool
        lambda: token_kd_loss(s, t, mask[:, :2]),  # wrong shape
        lambda: token_kd_loss(s, t[..., :7], mask),  # teacher vocabulary differs
        lambda: token_kd_loss(s, sig[:1], mask),  # signal positions differ
        lambda: token_kd_loss(s, t, mask, chunk_size=0),
        lambda: token_kd_loss(s, t, mask, chunk_size=2.5),
        lambda: token_divergence(s[0], "teacher"),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    assert set(LOSS_TYPES) == {"forward_kl", "reverse_kl", "jsd", "tvd"}


# --------------------------------------------------------------------------- top-k tail precision


def test_stored_top_k_signal_keeps_reverse_kl_within_one_percent_on_a_near_flat_teacher():
    """The engine stores top-k signals as float32 log-probs + int32 ids + the float32 tail mass
    (distill.recipes.causal_lm.precompute_topk). On a near-flat teacher the tail holds almost all
    the mass and reverse KL is small, so 1 - sum(p_top) from float16 log-probs was measured
    12-31% off; the stored form must stay within 1% of the exact (float64) top-k-plus-tail value."""
    generator = torch.Generator().manual_seed(0)
    vocab, k, temperature = 32_000, 64, 1.0
    teacher = 0.05 * torch.randn(16, vocab, generator=generator, dtype=torch.float64)
    student = teacher + 0.05 * torch.randn(16, vocab, generator=generator, dtype=torch.float64)

    # The student side in float64 throughout, so only the teacher signal's storage differs.
    exact = token_divergence(student, teacher_topk(teacher, k, temperature), "reverse_kl", temperature)
    stored = teacher_topk(teacher.float(), k, temperature)
    stored = TopKSignal(stored.logprobs.float(), stored.indices.int(), stored.tail_logprob.float())
    assert stored.bytes_per_position() == 8 * k + 4
    as_read = TopKSignal(stored.logprobs.double(), stored.indices, stored.tail_logprob.double())
    got = token_divergence(student, as_read, "reverse_kl", temperature)
    relative = ((got - exact).abs() / exact).max().item()
    assert relative < 0.01, relative

    # The old store (float16 log-probs, tail = 1 - sum p) is what this guards against.
    half = TopKSignal(stored.logprobs.half().double(), stored.indices)
    old = token_divergence(student, half, "reverse_kl", temperature)
    assert ((old - exact).abs() / exact).max().item() > 0.01
