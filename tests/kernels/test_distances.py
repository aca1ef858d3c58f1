"""Every Numba kernel against a plain torch reference written here: values and gradients
(autograd on the reference, gradcheck through the bridge in float64), on seeded inputs
including the edge cases; plus Hypothesis properties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import kernels
from pipeline.losses import distance_loss, sampled_kl_loss, topk_kl_loss, torch_topk_kl
from pipeline.representations import sample_counts


def ref_dense(name, s, t, T=1.0, beta=0.5):
    """Per-row reference, written out the textbook way."""
    if name == "mse":
        return F.mse_loss(s, t, reduction="none").mean(-1)
    if name == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if name == "euclidean":
        return torch.linalg.vector_norm(s - t, dim=-1)
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    if name == "tv":
        return T * T * 0.5 * torch.linalg.vector_norm(q - p, ord=1, dim=-1)
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    if name == "kl" or (name == "js" and beta == 0):
        return T * T * F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    if name == "reverse_kl" or (name == "js" and beta == 1):
        return T * T * F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    lm = torch.logaddexp(lp + np.log(beta), lq + np.log(1 - beta))  # log(beta p + (1-beta) q), stably
    return T * T * (beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1))


def check_dense(name, s, t, T=1.0, beta=0.5, rtol=1e-5, atol=1e-6, mask=None, weights=None, reduction="none"):
    loss, grad = kernels.distance(name, s, t, temperature=T, beta=beta, mask=mask, weights=weights,
                                  reduction=reduction)
    st_ = torch.tensor(s.astype(np.float64), requires_grad=True)
    rows = ref_dense(name, st_, torch.tensor(t.astype(np.float64)), T, beta)
    w = torch.ones(len(s), dtype=torch.float64)
    if mask is not None:
        w = w * torch.tensor(mask, dtype=torch.float64)
    if weights is not None:
        w = w * torch.tensor(weights, dtype=torch.float64)
    rows = rows * w
    ref = rows if reduction == "none" else (rows.sum() / w.sum() if reduction == "mean" else rows.sum())
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=rtol, atol=atol, err_msg=f"{name} loss")
    np.testing.assert_allclose(grad, st_.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"{name} grad")


def rand(shape, scale=3.0, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("name", kernels.DENSE)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("C", [2, 37, 1000])
def test_dense_matches_reference(name, T, C):
    check_dense(name, rand((19, C), seed=C), rand((19, C), seed=C + 1), T, rtol=2e-4, atol=1e-5)  # float32: 1e-5


@pytest.mark.parametrize("name", kernels.DENSE)
def test_dense_large_vocabulary(name):
    check_dense(name, rand((2, 128_000), 1.0, 5), rand((2, 128_000), 2.0, 6), 1.0, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("T", [0.5, 8.0])
def test_huge_logits_are_exact_in_float64(name, T):
    s, t = rand((6, 40), 1e4, 7, np.float64), rand((6, 40), 1e4, 8, np.float64)
    loss, grad = kernels.distance(name, s.astype(np.float32), t.astype(np.float32), temperature=T, reduction="none")
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    check_dense(name, s, t, T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_js_beta_family(beta):
    check_dense("js", rand((11, 30), seed=9), rand((11, 30), seed=10), 2.0, beta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", kernels.DENSE)
def test_one_hot_teacher(name):
    t = np.full((4, 12), -1e4, np.float32)
    t[np.arange(4), [0, 3, 7, 11]] = 1e4
    check_dense(name, rand((4, 12), seed=11), t, 1.0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", kernels.DENSE)
def test_float16_teacher_is_read_without_changing_values(name):
    s, t16 = rand((9, 50), seed=12), rand((9, 50), seed=13).astype(np.float16)
    a = kernels.distance(name, s, t16, temperature=2.0, reduction="none")
    b = kernels.distance(name, s, t16.astype(np.float32), temperature=2.0, reduction="none")
    # same values read; only the summation order may differ (vectorised gathers): float32 rounding
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", kernels.DENSE)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_weights_and_reductions(name, reduction):
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    weights = np.linspace(0.5, 2.0, 8)
    check_dense(name, rand((8, 16), seed=14), rand((8, 16), seed=15), 2.0, mask=mask, weights=weights,
                reduction=reduction, rtol=1e-5, atol=1e-7)


def test_tv_is_zero_between_equal_rows_and_t_squared_between_disjoint_ones():
    s = rand((6, 30), seed=20)
    loss, _ = kernels.tv(s, s.copy(), temperature=2.0, reduction="none")
    # float32 rounding of two sums of the same terms (fastmath may order them apart) at most;
    # (the gradient there is a subgradient of |.|: the rounding's signs, as torch's would be)
    assert np.abs(loss).max() < 1e-6
    teacher, student = np.full((3, 30), -1e4, np.float32), np.full((3, 30), -1e4, np.float32)
    teacher[:, 0], student[:, 1] = 1e4, 1e4  # all the mass on different classes
    loss, _ = kernels.tv(student, teacher, temperature=2.0, reduction="none")
    np.testing.assert_allclose(loss, 4.0, rtol=1e-6)  # T^2 * 1


@pytest.mark.parametrize("name", kernels.DENSE)
def test_gradcheck_through_the_autograd_bridge(name):
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64) * 2
    mask = torch.tensor([1, 1, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda x: distance_loss(name, x, t, temperature=2.0, mask=mask), (s,))
    assert torch.autograd.gradcheck(lambda x: distance_loss(name, x, t, temperature=2.0, reduction="none"), (s,))


# --- sparse -------------------------------------------------------------------------------------


def ref_topk(s, t, k, T):
    """KL between K+1-bucket coarsenings of p and q, from the full teacher row."""
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    idx = torch.topk(t, k, dim=-1).indices
    pk, qk = p.gather(1, idx), q.gather(1, idx)
    P = torch.cat([pk, (1 - pk.sum(-1, keepdim=True)).clamp_min(0)], 1)
    q_tail = q.masked_fill(torch.zeros_like(q, dtype=torch.bool).scatter_(1, idx, True), 0).sum(-1, keepdim=True)
    Q = torch.cat([qk, q_tail], 1)
    return T * T * torch.where((P > 0) & (Q > 0), P * (P.log() - Q.log()), torch.zeros_like(P)).sum(-1)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("C,k", [(2, 1), (50, 5), (50, 50), (1000, 64)])
def test_topk_kl_matches_reference(T, C, k):
    t64, s64 = rand((13, C), 3.0, C, np.float64), rand((13, C), 3.0, C + 1, np.float64)
    tt = torch.from_numpy(t64)
    val, idx = torch.topk(tt, k, dim=-1)
    lse = torch.logsumexp(tt / T, -1)
    loss, grad = kernels.topk_kl(s64, idx.numpy(), val.numpy(), lse.numpy(), temperature=T, reduction="none")
    st_ = torch.tensor(s64, requires_grad=True)
    ref = ref_topk(st_, tt, k, T)
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(grad, st_.grad.numpy(), rtol=1e-7, atol=1e-9)
    if k == C:  # nothing in the tail: exactly the full KL
        np.testing.assert_allclose(loss, ref_dense("kl", torch.from_numpy(s64), tt, T).numpy(), rtol=1e-9)


def test_topk_kl_gradcheck_and_float32():
    torch.manual_seed(1)
    t = torch.randn(6, 20, dtype=torch.float64) * 3
    val, idx = torch.topk(t, 4)
    lse = torch.logsumexp(t / 2.0, -1)
    s = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: topk_kl_loss(x, idx, val, lse, temperature=2.0), (s,))
    l32 = topk_kl_loss(s.detach().float(), idx, val.float(), lse.float(), temperature=2.0)
    torch.testing.assert_close(l32.double(), topk_kl_loss(s.detach(), idx, val, lse, temperature=2.0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_padded_topk_rows_equal_rows_without_the_padding(T):
    """An id of -1 (an adaptive row's unused entries; value -inf) is skipped: each row's loss
    and gradient equal those of the same row holding only its kept entries, in the Numba
    kernel and in the torch path, and a row keeping one entry still distils its tail."""
    rng = np.random.default_rng(7)
    n, c, k = 5, 30, 6
    t = torch.from_numpy(rng.standard_normal((n, c)) * 3)
    s64 = rng.standard_normal((n, c)) * 2
    val, idx = torch.topk(t, k, dim=-1)
    lse = torch.logsumexp(t / T, -1)
    keep = [6, 1, 3, 6, 2]  # entries each row keeps, largest first
    pidx, pval = idx.clone(), val.clone()
    for r, kr in enumerate(keep):
        pidx[r, kr:], pval[r, kr:] = -1, -np.inf
    loss, grad = kernels.topk_kl(s64, pidx.numpy(), pval.numpy(), lse.numpy(), temperature=T, reduction="none")
    st_ = torch.tensor(s64, requires_grad=True)
    ref = torch_topk_kl(st_, pidx, pval, lse, T)  # the CUDA path, on CPU tensors
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(grad, st_.grad.numpy(), rtol=1e-7, atol=1e-9)
    for r, kr in enumerate(keep):
        lr, gr = kernels.topk_kl(s64[r:r + 1], idx[r:r + 1, :kr].numpy(), val[r:r + 1, :kr].numpy(),
                                 lse[r:r + 1].numpy(), temperature=T, reduction="none")
        np.testing.assert_allclose(loss[r], lr[0], rtol=1e-12)
        np.testing.assert_allclose(grad[r], gr[0], rtol=1e-12, atol=1e-15)
        want = ref_topk(torch.from_numpy(s64[r:r + 1]), t[r:r + 1], kr, T)
        np.testing.assert_allclose(loss[r], want.item(), rtol=1e-7)
    assert loss[1] > 0  # one kept id: its probability and the tail still differ from the student's


def ref_sampled(s, idx, cnt, ent, T):
    lq = F.log_softmax(s / T, -1)
    w = cnt.double() / cnt.double().sum(-1, keepdim=True)
    return T * T * (-(w * lq.gather(1, idx.long().clamp_min(0))).sum(-1) - ent)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 8.0])
def test_sampled_kl_matches_reference(T):
    t = torch.from_numpy(rand((12, 40), 3.0, 20, np.float64))
    idx, cnt = sample_counts(t, 16, T, torch.Generator().manual_seed(0))
    lp = F.log_softmax(t / T, -1)
    ent = -(lp.exp() * lp).sum(-1)
    s = torch.tensor(rand((12, 40), 3.0, 21, np.float64), requires_grad=True)
    loss, grad = kernels.sampled_kl(s.detach().numpy(), idx.numpy(), cnt.numpy(), ent.numpy(), temperature=T,
                                    reduction="none")
    ref = ref_sampled(s, idx, cnt, ent, T)
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(lambda x: sampled_kl_loss(x, idx, cnt, ent, temperature=T), (s.detach()
                                                                                                  .requires_grad_(),))


# --- errors -------------------------------------------------------------------------------------


def test_invalid_inputs_name_the_argument():
    s, t = rand((3, 5)), rand((3, 5))
    with pytest.raises(ValueError, match="teacher shape"):
        kernels.distance("kl", s, t[:, :4])
    with pytest.raises(ValueError, match="temperature=0"):
        kernels.distance("js", s, t, temperature=0)
    with pytest.raises(ValueError, match="beta=1.5"):
        kernels.distance("js", s, t, beta=1.5)
    with pytest.raises(ValueError, match="distance 'hinge' is unknown or not dense"):
        kernels.distance("hinge", s, t)
    bad = t.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"teacher holds non-finite values at rows \[1\]"):
        kernels.distance("kl", s, bad)
    with pytest.raises(ValueError, match="mask must have shape"):
        kernels.distance("mse", s, t, mask=np.ones(4, bool))
    idx = np.tile(np.arange(6), (3, 1))
    with pytest.raises(ValueError, match="K=6 is larger than the student's 5 classes"):
        kernels.topk_kl(s, idx, rand((3, 6)), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        kernels.topk_kl(s, idx[:, :2] + 4, rand((3, 2)), np.zeros(3, np.float32))
    ids, counts, ent = np.array([[0, 1], [2, 5], [3, -1]]), np.array([[1, 1], [1, 1], [2, 0]], np.uint16), np.ones(3)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):  # a drawn id past the student's classes
        kernels.sampled_kl(s, ids, counts, ent)
    ids[1, 1] = -2
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):  # a negative id with a count
        kernels.sampled_kl(s, ids, counts, ent)
    ids[1, 1] = 4  # -1 with count 0 is padding: it trains
    assert np.isfinite(kernels.sampled_kl(s, ids, counts, ent)[0])
    with pytest.raises(ValueError, match="reduction='avg'"):
        kernels.distance("kl", s, t, reduction="avg")


# --- properties ---------------------------------------------------------------------------------

rows = arrays(np.float64, (3, 6), elements=st.floats(-30, 30, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(rows, rows, st.sampled_from([0.5, 1.0, 3.0]))
def test_kl_is_nonnegative_and_zero_iff_equal(s, t, T):
    loss, _ = kernels.distance("kl", s, t, temperature=T, reduction="none")
    assert (loss >= -1e-12).all()
    same, _ = kernels.distance("kl", t, t, temperature=T, reduction="none")
    np.testing.assert_allclose(same, 0, atol=1e-12)
    p, q = F.softmax(torch.from_numpy(t) / T, -1), F.softmax(torch.from_numpy(s) / T, -1)
    differs = (p - q).abs().max(-1).values.numpy() > 1e-3
    assert (loss[differs] > 0).all()


@settings(max_examples=60, deadline=None)
@given(rows, rows)
def test_js_symmetric_at_half_and_bounded_by_log2(s, t):
    a, _ = kernels.distance("js", s, t, beta=0.5, reduction="none")
    b, _ = kernels.distance("js", t, s, beta=0.5, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert (a >= -1e-12).all() and (a <= np.log(2) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(rows, rows)
def test_cosine_in_0_2(s, t):
    loss, _ = kernels.distance("cosine", s, t, reduction="none")
    assert (loss >= -1e-12).all() and (loss <= 2 + 1e-12).all()
