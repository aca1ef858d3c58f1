"""The divergences between bucket distributions (the skewed KLs' and TAID's sparse forms,
over the top-K + tail bucket or the draws' frequencies, and AKL over the top-K + tail
bucket): the Numba kernel and the torch rows (the CUDA path) against the definitions written
here in float64 NumPy, values and gradients, on hand-made and seeded rows; their ends (b = 0:
top-k KL and sampled KL; b = 1: nothing to learn; K = C: dense AKL and TAID; TAID at t = 1:
top-k KL), TAID's schedule, and their refusals."""

import numpy as np
import pytest
import torch

from pipeline import kernels
from pipeline.distances import PROGRESS, distance_spec
from pipeline.losses import (
    distance_term,
    torch_akl,
    torch_akl_topk,
    torch_skew_kl_sampled,
    torch_skew_kl_topk,
    torch_skew_reverse_kl_sampled,
    torch_skew_reverse_kl_topk,
    torch_taid,
    torch_taid_sampled,
    torch_taid_topk,
)
from pipeline.representations import sample_counts

TORCH_ROWS = {"skew_kl_topk": torch_skew_kl_topk, "skew_reverse_kl_topk": torch_skew_reverse_kl_topk,
              "skew_kl_sampled": torch_skew_kl_sampled, "skew_reverse_kl_sampled": torch_skew_reverse_kl_sampled}
FORMS = list(TORCH_ROWS)


def softmax(x, T):
    z = np.asarray(x, np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def buckets(name, s_row, arrays_row, T):
    """One row's teacher and student bucket masses: the entries held (top-k ids, or drawn
    ids), then the rest; the teacher's side from its top-K logits and logsumexp at T, or the
    draws' frequencies, the student's from its softmax."""
    q = softmax(s_row, T)
    if name.endswith("topk"):
        ids, val, lse = arrays_row
        held = ids >= 0
        pk = np.exp(val[held] / T - lse)
        P = np.append(pk, 1 - pk.sum())
    else:
        ids, cnt, _ = arrays_row
        held = cnt > 0
        P = np.append(cnt[held] / cnt.sum(), 0.0)
    rest = np.ones(len(q), bool)
    rest[ids[held]] = False
    return P, np.append(q[ids[held]], q[rest].sum())


def kl(A, B):
    return sum(a * np.log(a / b) for a, b in zip(A, B, strict=True) if a > 0)


def definition(name, s_row, arrays_row, T, beta):
    """T^2 KL(A || b A + (1-b) B) between the buckets of one row: the entries held (top-k ids,
    or drawn ids) and the rest; the teacher's side from the softmax of its logits at T (top-k)
    or the draws' frequencies, the student's from its softmax."""
    P, Q = buckets(name, s_row, arrays_row, T)
    A, B = (Q, P) if "reverse" in name else (P, Q)
    return T * T * kl(A, beta * A + (1 - beta) * B)


def akl_definition(P, Q, mu=0.5, rest_first=True):
    """AKL as its authors compute it: buckets sorted by teacher mass, least first (the tail
    bucket, last here, first of all where ``rest_first``; equal masses the later first), the
    tail those whose running mass stays under mu, wf = the head's sum |P - Q| over both sums."""
    order = [len(P) - 2 - i for i in np.argsort(P[-2::-1], kind="stable")]
    order = [len(P) - 1, *order] if rest_first else list(np.argsort(P, kind="stable"))
    tail = np.zeros(len(P), bool)
    tail[order] = np.cumsum(P[order]) < mu
    gap = np.abs(P - Q)
    wf = gap[~tail].sum() / gap.sum()
    return wf * kl(P, Q) + (1 - wf) * kl(Q, P)


def arrays_for(name, t, T, seed=0):
    if name.endswith("topk"):
        val, idx = torch.topk(torch.from_numpy(t), 8)
        idx, val = idx.numpy().astype(np.int32), val.numpy().copy()
        idx[2, 3:], val[2, 3:] = -1, -np.inf
        lse = torch.logsumexp(torch.from_numpy(t) / T, -1).numpy()
        return idx, val, lse
    idx, cnt = sample_counts(torch.from_numpy(t), 16, T, torch.Generator().manual_seed(seed))
    lp = torch.log_softmax(torch.from_numpy(t) / T, -1)
    return idx.numpy(), cnt.numpy(), (-(lp.exp() * lp).sum(-1)).numpy()


def data(name, T, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((7, 40)) * 3
    t[1, 5] = 40.0  # nearly one-hot: the tail holds almost nothing
    s = rng.standard_normal((7, 40)) * 3
    return s, arrays_for(name, t, T, seed)


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_kernel_and_torch_rows_equal_the_definition(name, T, beta):
    s, arrays = data(name, T)
    loss, grad = getattr(kernels, name)(s, *arrays, temperature=T, beta=beta, reduction="none")
    want = [definition(name, s[i], [a[i] for a in arrays], T, beta) for i in range(len(s))]
    np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)
    x = torch.tensor(s, requires_grad=True)
    ref = TORCH_ROWS[name](x, *(torch.from_numpy(np.asarray(a)) for a in arrays), T, beta)
    np.testing.assert_allclose(ref.detach().numpy(), want, rtol=1e-9, atol=1e-12)
    ref.sum().backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", FORMS)
def test_gradcheck_through_the_bridge_and_float32(name):
    s, arrays = data(name, 2.0, seed=3)
    x = torch.tensor(s, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: distance_term(name, v, arrays, temperature=2.0, beta=0.2), (x,))
    l64 = distance_term(name, x.detach(), arrays, temperature=2.0, beta=0.2)
    l32 = distance_term(name, x.detach().float(), tuple(a.astype(np.float32) if a.dtype == np.float64 else a
                                                         for a in arrays), temperature=2.0, beta=0.2)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_at_b_0_the_forward_forms_are_topk_kl_and_sampled_kls_gradient(T):
    s, arrays = data("skew_kl_topk", T)
    np.testing.assert_allclose(kernels.skew_kl_topk(s, *arrays, temperature=T, beta=0.0, reduction="none")[0],
                               kernels.topk_kl(s, *arrays, temperature=T, reduction="none")[0], rtol=1e-9)
    np.testing.assert_allclose(kernels.skew_kl_topk(s, *arrays, temperature=T, beta=0.0)[1],
                               kernels.topk_kl(s, *arrays, temperature=T)[1], rtol=1e-9, atol=1e-14)
    s, arrays = data("skew_kl_sampled", T)
    np.testing.assert_allclose(kernels.skew_kl_sampled(s, *arrays, temperature=T, beta=0.0)[1],
                               kernels.sampled_kl(s, *arrays, temperature=T)[1], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", FORMS)
def test_at_b_1_nothing_is_learned_and_masked_rows_are_skipped(name):
    s, arrays = data(name, 1.0)
    loss, grad = getattr(kernels, name)(s, *arrays, beta=1.0, reduction="none")
    assert np.abs(loss).max() < 1e-12 and np.abs(grad).max() < 1e-12
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    loss, grad = getattr(kernels, name)(s, *arrays, beta=0.3, mask=mask, reduction="none")
    full, full_grad = getattr(kernels, name)(s, *arrays, beta=0.3, reduction="none")
    assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all()
    np.testing.assert_array_equal(loss[mask], full[mask])
    mean = getattr(kernels, name)(s, *arrays, beta=0.3, mask=mask)[0]
    assert mean == pytest.approx(full[mask].mean(), rel=1e-12)


def test_padding_entries_are_rows_without_them():
    s, (idx, val, lse) = data("skew_kl_topk", 2.0)
    for name in ("skew_kl_topk", "skew_reverse_kl_topk"):
        loss, grad = getattr(kernels, name)(s, idx, val, lse, temperature=2.0, reduction="none")
        one, one_grad = getattr(kernels, name)(s[2:3], idx[2:3, :3], val[2:3, :3], lse[2:3], temperature=2.0,
                                               reduction="none")
        assert loss[2] == pytest.approx(one[0], rel=1e-12)
        np.testing.assert_allclose(grad[2], one_grad[0], rtol=1e-12, atol=1e-16)


def test_refusals_name_what_is_wrong():
    s, (idx, val, lse) = data("skew_kl_topk", 1.0)
    with pytest.raises(ValueError, match=r"beta=1.5: must be in \[0, 1\] \(the skew"):
        kernels.skew_kl_topk(s, idx, val, lse, beta=1.5)
    bad = lse.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match=r"teacher top-k holds non-finite values at rows \[4\]"):
        kernels.skew_reverse_kl_topk(s, idx, val, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 40\)"):
        kernels.skew_kl_topk(s, idx + 1, val, lse)
    s, (ids, cnt, ent) = data("skew_kl_sampled", 1.0)
    cnt = cnt.copy()
    cnt[3] = 0  # a row without draws that counts
    with pytest.raises(ValueError, match=r"teacher samples holds non-finite values at rows \[3\]"):
        kernels.skew_kl_sampled(s, ids, cnt, ent)
    mask = np.ones(len(s), bool)
    mask[3] = False  # the same row masked (padding): skipped
    assert np.isfinite(kernels.skew_kl_sampled(s, ids, cnt, ent, mask=mask)[0])


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_akl_kernel_and_torch_rows_equal_the_definition(T):
    """AKL over the top-K + tail: the rows of data() (a padded row, a near one-hot one), a
    flat teacher whose tail bucket holds more than half the mass (a head of its own), and
    one of integer logits (equal masses: the head and the tail split them alike)."""
    s, arrays = data("akl_topk", T)
    flat = arrays_for("akl_topk", np.random.default_rng(5).standard_normal((7, 40)) * 0.2, T)
    tied = arrays_for("akl_topk", np.round(np.random.default_rng(6).standard_normal((7, 40)) * 3), T)  # equal masses
    for idx, val, lse in (arrays, flat, tied):
        loss, grad = kernels.akl_topk(s, idx, val, lse, temperature=T, reduction="none")
        want = [T * T * akl_definition(*buckets("topk", s[i], (idx[i], val[i], lse[i]), T)) for i in range(len(s))]
        np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)
        x = torch.tensor(s, requires_grad=True)
        ref = torch_akl_topk(x, *(torch.from_numpy(a) for a in (idx, val, lse)), T)
        np.testing.assert_allclose(ref.detach().numpy(), want, rtol=1e-9, atol=1e-12)
        ref.sum().backward()  # wf held constant on both sides, as AKL's authors detach it
        np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-12)
    p_tail = 1 - np.exp(flat[1] / T - flat[2][:, None]).sum(1)
    assert (p_tail > 0.5).all()  # the flat rows' tail bucket is a head bucket: the case is exercised


def test_akl_over_every_class_is_dense_akl_as_its_authors_define_it():
    s, _ = data("akl_topk", 2.0)
    t = np.random.default_rng(9).standard_normal((7, 40)) * 3
    val, idx = torch.topk(torch.from_numpy(t), 40)
    lse = torch.logsumexp(torch.from_numpy(t) / 2.0, -1)
    loss, grad = kernels.akl_topk(s, idx.numpy(), val.numpy(), lse.numpy(), temperature=2.0, reduction="none")
    want = [4.0 * akl_definition(np.append(softmax(t[i], 2.0), 0.0), np.append(softmax(s[i], 2.0), 0.0),
                                 rest_first=False) for i in range(7)]
    np.testing.assert_allclose(loss, want, rtol=1e-9)
    x = torch.tensor(s, requires_grad=True)
    dense = torch_akl(x, torch.from_numpy(t), 2.0)
    np.testing.assert_allclose(dense.detach().numpy(), want, rtol=1e-9)
    dense.sum().backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-13)


def taid_definition(P, Q, t):
    """KL(P_t || Q), P_t proportional to Q^(1-t) P^t over the buckets."""
    m = np.array([q ** (1 - t) * p ** t if p > 0 else 0.0 for p, q in zip(P, Q, strict=True)])
    return kl(m / m.sum(), Q)


@pytest.mark.parametrize("name", ["taid_topk", "taid_sampled"])
@pytest.mark.parametrize("t", [0.4, 0.7, 1.0])
def test_taid_kernel_and_torch_rows_equal_the_definition(name, t):
    s, arrays = data(name, 2.0)
    loss, grad = getattr(kernels, name)(s, *arrays, temperature=2.0, beta=t, reduction="none")
    want = [4.0 * taid_definition(*buckets(name, s[i], [a[i] for a in arrays], 2.0), t) for i in range(len(s))]
    np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)
    x = torch.tensor(s, requires_grad=True)
    ref = {"taid_topk": torch_taid_topk, "taid_sampled": torch_taid_sampled}[name](
        x, *(torch.from_numpy(np.asarray(a)) for a in arrays), 2.0, t)
    np.testing.assert_allclose(ref.detach().numpy(), want, rtol=1e-9, atol=1e-12)
    ref.sum().backward()  # the target held constant on both sides (the student's side detached)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-12)
    if t == 1.0 and name == "taid_topk":  # the teacher itself: top-k KL
        np.testing.assert_allclose(loss, kernels.topk_kl(s, *arrays, temperature=2.0, reduction="none")[0],
                                   rtol=1e-9)
    assert np.abs(getattr(kernels, name)(s, *arrays, temperature=2.0, beta=0.0, reduction="none")[0]).max() < 1e-12


def test_taid_over_every_class_is_dense_taid_the_interpolated_logits():
    s, _ = data("taid_topk", 2.0)
    t = np.random.default_rng(9).standard_normal((7, 40)) * 3
    val, idx = torch.topk(torch.from_numpy(t), 40)
    lse = torch.logsumexp(torch.from_numpy(t) / 2.0, -1)
    loss, grad = kernels.taid_topk(s, idx.numpy(), val.numpy(), lse.numpy(), temperature=2.0, beta=0.6,
                                   reduction="none")
    want = [4.0 * kl(softmax(0.4 * s[i] + 0.6 * t[i], 2.0), softmax(s[i], 2.0)) for i in range(7)]
    np.testing.assert_allclose(loss, want, rtol=1e-9)
    x = torch.tensor(s, requires_grad=True)
    dense = torch_taid(x, torch.from_numpy(t), 2.0, 0.6)
    np.testing.assert_allclose(dense.detach().numpy(), want, rtol=1e-9)
    dense.sum().backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-13)


def test_taid_weight_moves_from_its_start_to_1_with_the_training_loop():
    """loss.beta (default 0.4) is where TAID's teacher weight starts; it rises linearly with
    the loop's progress, reaches 1 outside a loop; the other distances ignore the progress;
    the loop sets the progress before each batch and puts it back to 1 after."""
    from torch import nn

    from pipeline.training import train

    spec = distance_spec("taid_topk")
    token = PROGRESS.set(0.5)
    try:
        assert spec.beta_of(None) == pytest.approx(0.7) and spec.beta_of(0.2) == pytest.approx(0.6)
        assert distance_spec("skew_kl_topk").beta_of(None) == 0.1
    finally:
        PROGRESS.reset(token)
    assert spec.beta_of(None) == 1.0
    seen = []

    def loss_fn(model, batch):
        seen.append(PROGRESS.get())
        return model(batch).sum()

    stream = [torch.ones(1, 2)] * 2  # two batches an epoch
    train(nn.Linear(2, 1), stream, 4, loss_fn, lr=0.0, weight_decay=0.0, desc="taid")
    assert seen == [0.0, 0.25, 0.5, 0.75] and PROGRESS.get() == 1.0
