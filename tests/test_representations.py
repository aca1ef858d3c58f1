"""Top-k and sampled representations against the full distribution they summarise."""

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.representations import sample_counts, topk_distribution
from tests.conftest import write_cache


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
