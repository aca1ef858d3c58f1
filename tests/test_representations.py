"""Top-k and sampled representations against the full distribution they summarise."""

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.representations import sample_counts, topk_distribution
from tests.support import write_cache


def test_topk_and_tail_read_back_equal_the_full_distribution(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 50)) * 3).astype(np.float32)
    write_cache(tmp_path / "c", logits, dtype="float32", modes=("full", "topk"), k=5, temperatures=(1.0, 2.0))
    r = open_cache(str(tmp_path / "c"))
    idx, val, lse = (torch.from_numpy(r.arrays[n].compute()) for n in ("topk_idx", "topk_val", "lse"))
    full = torch.from_numpy(logits)
    for j, T in enumerate((1.0, 2.0)):
        p = torch.softmax(full / T, dim=-1)
        probs, tail = topk_distribution(val, lse[:, j], T)
        torch.testing.assert_close(probs, p.gather(1, idx.long()))
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx.long(), True)
        torch.testing.assert_close(tail, (p * ~kept).sum(-1), atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(idx.numpy(), torch.topk(full, 5).indices.numpy())


def test_sample_counts_are_distinct_ids_with_counts_summing_to_s():
    logits = torch.randn(32, 20)
    ids, counts = sample_counts(logits, 16, 1.0, torch.Generator().manual_seed(0))
    assert (counts.sum(1) == 16).all()
    for row_ids, row_cnt in zip(ids, counts, strict=False):
        real = row_ids[row_cnt > 0]
        assert len(set(real.tolist())) == len(real) and (row_ids[row_cnt == 0] == -1).all()


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_the_sampled_kl_training_uses_is_unbiased(path):
    """Both estimators training calls (the Numba kernel on CPU, plain torch on CUDA), fed
    the counts stage 1 draws, average to T^2 KL(p_T || q_T) over many draws."""
    from pipeline import kernels
    from pipeline.losses import torch_sampled_kl

    torch.manual_seed(0)
    t = torch.randn(8, 30, dtype=torch.float64) * 2
    s = torch.randn(8, 30, dtype=torch.float64)
    T = 2.0
    log_p = torch.log_softmax(t / T, -1)
    exact = T**2 * (log_p.exp() * (log_p - torch.log_softmax(s / T, -1))).sum(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    g = torch.Generator().manual_seed(1)
    draws = 4000

    def estimate(idx, cnt):
        if path == "torch":
            return torch_sampled_kl(s, idx, cnt, ent, T)
        loss, _ = kernels.sampled_kl(s.numpy(), idx.numpy(), cnt.numpy().astype(np.uint16), ent.numpy(),
                                     temperature=T, reduction="none")
        return torch.from_numpy(np.asarray(loss))

    est = torch.stack([estimate(*sample_counts(t, 8, T, g)) for _ in range(draws)])
    mean, se = est.mean(0), est.std(0) / draws**0.5
    assert ((mean - exact).abs() < 4 * se + 1e-9).all(), (mean, exact, se)
    assert not torch.allclose(est[0], exact)  # one draw is noisy: the test is about the mean


def test_a_sampled_only_cache_carries_the_exact_argmax(tmp_path):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((64, 50)) * 3).astype(np.float32)
    write_cache(tmp_path / "s", logits, modes=("sampled",), samples=4)
    write_cache(tmp_path / "st", logits, modes=("sampled", "topk"), samples=4)
    np.testing.assert_array_equal(open_cache(str(tmp_path / "s")).arrays["top1"].compute(), logits.argmax(1))
    assert "top1" not in open_cache(str(tmp_path / "st")).arrays  # the first top-k id is the argmax there


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [7, 64])
def test_quantized_topk_values_read_back_within_half_a_step(bits, k):
    """Each value within step / 2 of the original (step = (largest - smallest finite) /
    (2**bits - 2)), the largest exactly, -inf as -inf; ties, a flat row, an odd K."""
    from pipeline.cache.decode import dequantize
    from pipeline.representations import quantize_topk

    g = torch.Generator().manual_seed(bits * 100 + k)
    val = torch.sort(torch.randn(50, k, generator=g) * 4, dim=1, descending=True).values
    val[1] = 3.0  # a flat row
    val[2, k // 2:] = val[2, k // 2]  # ties
    val[3, -2:] = float("-inf")  # a teacher with masked ids
    val[4] *= 1e3  # a huge spread
    codes, params = quantize_topk(val, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (50, k if bits == 8 else (k + 1) // 2)
    got = dequantize(codes.numpy(), params.numpy(), bits, k)
    x = val.numpy().astype(np.float64)
    finite = np.isfinite(x)
    step = params.numpy()[:, 1:2].astype(np.float64)
    err = np.abs(np.where(finite, got, 0) - np.where(finite, x, 0))
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(got[:, 0], val.numpy()[:, 0])
    assert np.isneginf(got[3, -2:]).all() and np.isfinite(got[3, :-2]).all()
    np.testing.assert_array_equal(got[1], 3.0)
    spans = x[:, 0] - np.where(finite, x, np.inf).min(1)
    np.testing.assert_allclose(params.numpy()[5:, 1], spans[5:] / ((1 << bits) - 2), rtol=1e-6)


def test_adaptive_rows_keep_the_fewest_entries_whose_mass_reaches_top_p():
    """cut_topk: each row keeps its smallest prefix (largest first) whose probability reaches
    top_p, at least one entry and at most K; the rest are padding (-1, -inf). A sure row
    keeps one, a flat one all K (its K entries never reach top_p), ties are kept in order."""
    from pipeline.representations import cut_topk

    rng = np.random.default_rng(4)
    logits = np.concatenate([rng.standard_normal((40, 50)) * rng.uniform(0.3, 6, (40, 1)),
                             np.eye(50)[:2] * 40,  # sure rows
                             np.zeros((1, 50)),  # flat: 8 of 50 entries hold 16%
                             np.r_[[5.0] * 4, [0.0] * 46][None]],  # four tied ids hold ~all of it
                            ).astype(np.float32)
    x = torch.from_numpy(logits)
    val, idx = torch.topk(x, 8, dim=1)
    for T, top_p in ((1.0, 0.9), (2.0, 0.5), (1.0, 0.999)):
        lse = torch.logsumexp(x.double() / T, 1)
        cidx, cval = cut_topk(idx, val, lse.float(), T, top_p)
        p = np.exp(val.double().numpy() / T - lse.numpy()[:, None])
        for r in range(len(x)):
            kr = int((cidx[r] >= 0).sum())
            assert (cidx[r, :kr] == idx[r, :kr]).all() and (cval[r, :kr] == val[r, :kr]).all()
            assert (cidx[r, kr:] == -1).all() and torch.isneginf(cval[r, kr:]).all()
            mass = np.cumsum(p[r])
            assert kr == 8 or mass[kr - 1] >= top_p - 1e-6  # enough ...
            assert kr == 1 or mass[kr - 2] < top_p + 1e-6  # ... and no more than needed
        assert (cidx[40:42] >= 0).sum(1).tolist() == [1, 1] and (cidx[42] >= 0).sum() == 8
        if top_p == 0.9:
            assert (cidx[43] >= 0).sum() == 4
