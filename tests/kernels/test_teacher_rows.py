"""Stage 1's fused row pass against the torch composition it replaces on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache import Manifest
from pipeline.kernels import summarize_rows
from pipeline.representations import represent, represent_torch, sorted_uniforms


def manifest(modes=("sampled", "topk"), k=5, samples=8, temperatures=(1.0, 2.0), sample_temperature=2.0,
             num_classes=12) -> Manifest:
    return Manifest(backend="zarr", modes=list(modes), dtype="float32", num_classes=num_classes, rows=0,
                    chunk_rows=8, shard_rows=8, splits={}, fingerprint={}, k=k, samples=samples,
                    temperatures=list(temperatures), sample_temperature=sample_temperature)


def adversarial_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(12) * 3,
            np.r_[[2.0] * 7, [1.0] * 5],  # ties across the K-th place
            np.zeros(12),  # flat
            np.r_[[-np.inf] * 9, [1.0, 3.0, 2.0]],  # fewer finite logits than K
            np.r_[[1e30], np.zeros(11)],  # huge: all the mass on one class
            np.r_[[-3e38, 3e38], np.zeros(10)],  # float32's range
            rng.standard_normal(12) * 200]  # very sharp
    return np.array(rows, np.float32)


@pytest.mark.parametrize("k,temperatures,sample_temperature", [(5, (1.0, 2.0), 2.0), (12, (1.0,), 1.0),
                                                               (1, (0.5,), 4.0)])
def test_the_fused_pass_equals_the_torch_composition_on_adversarial_rows(k, temperatures, sample_temperature):
    x = torch.from_numpy(adversarial_rows())
    m = manifest(k=k, temperatures=temperatures, sample_temperature=sample_temperature)
    got = represent(x, m, torch.Generator().manual_seed(3))
    want = represent_torch(x, m, torch.Generator().manual_seed(3))
    assert got.keys() == want.keys()
    np.testing.assert_array_equal(got["topk_val"], want["topk_val"])  # the K largest values, largest first
    for r in range(len(x)):  # ids: the same set above the K-th value; ties at it by lower id first
        v, ids = got["topk_val"][r], got["topk_idx"][r]
        above = v > v[-1]
        assert set(ids[above].tolist()) == set(want["topk_idx"][r][above].tolist())
        for a in range(k - 1):
            if v[a] == v[a + 1]:
                assert ids[a] < ids[a + 1]
        np.testing.assert_array_equal(x[r, ids.long()], v)
    torch.testing.assert_close(got["lse"], want["lse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["sampled_ent"], want["sampled_ent"], rtol=1e-5, atol=1e-5)
    for name in ("sampled_idx", "sampled_cnt"):  # the same quantiles of the same distribution
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (got["sampled_idx"][3][got["sampled_cnt"][3] > 0] >= 9).all()  # a -inf logit is never drawn
    assert got["sampled_idx"][4].tolist()[:1] == [0] and got["sampled_cnt"][4][0] == 8


def test_rows_with_nan_or_inf_are_flagged_for_the_caller_to_refuse():
    x = adversarial_rows()[:3].copy()
    x[1, 4], x[2, 0] = np.nan, np.inf
    out = summarize_rows(x, 3, [1.0], 1.0, np.sort(np.random.default_rng(0).random((3, 4)), axis=1))
    assert np.isfinite(out["lse"][0]).all() and np.isfinite(out["ent"][0])
    assert np.isnan(out["lse"][1:]).all() and np.isnan(out["ent"][1:]).all()
    assert (out["s_idx"][1:] == -1).all() and (out["s_cnt"][1:] == 0).all()


def test_fused_draws_are_the_teacher_distribution():
    """The counts' mean over 40,000 rows of 8 draws equals p within 5 standard errors, for
    every class (a seeded run: this either holds for the seed or not, no flakiness)."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0], np.float64)
    logits = np.log(np.maximum(p, 1e-300)).astype(np.float32)
    logits[-1] = -np.inf
    n, s = 40_000, 8
    x = np.repeat(logits[None], n, axis=0)
    u = sorted_uniforms(n, s, torch.Generator().manual_seed(5)).numpy()
    out = summarize_rows(x, 0, [], 1.0, u)
    counts = np.zeros((n, len(p)))
    np.add.at(counts, (np.repeat(np.arange(n), s), np.where(out["s_idx"] >= 0, out["s_idx"], 0).ravel()),
              out["s_cnt"].ravel())
    freq = counts.mean(0) / s
    se = np.sqrt(p * (1 - p) / (n * s))
    assert (np.abs(freq - p) <= 5 * se + 1e-12).all(), (freq, p)
    assert counts[:, -1].sum() == 0


def test_the_fused_pass_equals_torch_on_random_rows_of_a_real_vocabulary_width():
    rng = np.random.default_rng(1)
    x = torch.from_numpy((rng.standard_normal((16, 49152)) * 4).astype(np.float32))
    m = manifest(k=64, samples=16, temperatures=(1.0,), sample_temperature=1.0, num_classes=49152)
    got = represent(x, m, torch.Generator().manual_seed(0))
    want = represent_torch(x, m, torch.Generator().manual_seed(0))
    for name in ("topk_idx", "topk_val", "sampled_idx", "sampled_cnt"):  # no ties among random float32 values
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    torch.testing.assert_close(got["lse"], want["lse"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["sampled_ent"], want["sampled_ent"], rtol=1e-5, atol=0)


def wide_rows(width: int = 1300) -> np.ndarray:
    """Rows across several blocks and sub-blocks, the last ones partial (1,300 = 2 x 512 + 276)."""
    rng = np.random.default_rng(2)
    ramp = np.linspace(-50.0, 50.0, width)  # a new maximum in every block: the running sums rescale each time
    first_blocks_empty = np.r_[[-np.inf] * 600, rng.standard_normal(width - 600) * 3]
    ties = np.where(rng.random(width) < 0.05, 2.0, 1.0)  # ties across the K-th place, in every sub-block
    ties[-1] = 3.0  # the maximum in the last (partial) sub-block
    bf16_like = np.round(rng.standard_normal(width) * 8 * 16) / 16  # few distinct values
    zeros = np.where(rng.random(width) < 0.3, np.where(rng.random(width) < 0.5, 0.0, -0.0), -1.0)
    zeros[rng.choice(width, 4, replace=False)] = 5.0  # the K-th place is a tie of -0 and +0, equal values
    return np.array([ramp, first_blocks_empty, ties, bf16_like, rng.standard_normal(width) * 0.01, zeros], np.float32)


@pytest.mark.parametrize("k,samples", [(64, 16), (5, 3), (1, 64)])
def test_the_fused_pass_equals_the_torch_composition_across_blocks(k, samples):
    x = torch.from_numpy(wide_rows())
    m = manifest(k=k, samples=samples, temperatures=(1.0, 0.5), sample_temperature=1.0, num_classes=x.shape[1])
    got = represent(x, m, torch.Generator().manual_seed(4))
    want = represent_torch(x, m, torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(got["topk_val"], want["topk_val"])
    for r in range(len(x)):
        v, ids = got["topk_val"][r], got["topk_idx"][r]
        above = v > v[-1]
        assert set(ids[above].tolist()) == set(want["topk_idx"][r][above].tolist())
        at = ids[v == v[-1]]
        if (x[r] == v[-1]).sum() > len(at):  # ties cut at the K-th place: the lowest ids are kept
            np.testing.assert_array_equal(at, np.flatnonzero(x[r].numpy() == v[-1].item())[:len(at)])
        np.testing.assert_array_equal(x[r, ids.long()], v)
    torch.testing.assert_close(got["lse"], want["lse"], rtol=1e-6, atol=1e-6)
    logp = torch.log_softmax(x.double(), -1)  # the entropy in float64 (torch's float32 lse - E[z] cancels
    exact = -(logp.exp() * logp.nan_to_num(0.0, 0.0, 0.0)).sum(-1).float()  # on the sharp rows)
    torch.testing.assert_close(got["sampled_ent"], exact, rtol=1e-5, atol=1e-6)
    for name in ("sampled_idx", "sampled_cnt"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (got["sampled_idx"][1][got["sampled_cnt"][1] > 0] >= 600).all()  # never a -inf class


def test_bfloat16_rows_are_read_as_they_are():
    """A bfloat16 batch is read in place (its bits, no float32 copy), to the same results as
    its float32 values (sums to float32 rounding: the two are compiled apart, and fastmath
    may order their reductions differently)."""
    x = torch.from_numpy(wide_rows()).bfloat16()
    m = manifest(k=16, samples=8, temperatures=(1.0, 2.0), sample_temperature=2.0, num_classes=x.shape[1])
    got = represent(x, m, torch.Generator().manual_seed(1))
    want = represent(x.float(), m, torch.Generator().manual_seed(1))
    assert got.keys() == want.keys()
    for name in got.keys() - {"lse", "sampled_ent"}:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("lse", "sampled_ent"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [700.0, -700.0])
def test_bfloat16_rows_beyond_the_exp_table_take_the_online_pass(shift):
    """A bfloat16 row whose max / T leaves the exp table's range (float64's exp ends at 709)
    is summed against its maximum instead, to the same results as its float32 values."""
    x = (torch.from_numpy(wide_rows()) + shift).bfloat16()
    m = manifest(k=16, samples=8, temperatures=(1.0, 2.0), sample_temperature=1.0, num_classes=x.shape[1])
    got = represent(x, m, torch.Generator().manual_seed(1))
    for want in (represent(x.float(), m, torch.Generator().manual_seed(1)),
                 represent_torch(x.float(), m, torch.Generator().manual_seed(1))):
        np.testing.assert_array_equal(got["topk_val"], want["topk_val"])
        for name in ("sampled_idx", "sampled_cnt"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        torch.testing.assert_close(got["lse"], want["lse"], rtol=1e-6, atol=0)
    assert torch.isfinite(got["lse"]).all()


def test_nan_or_inf_anywhere_in_a_wide_row_is_flagged():
    x = wide_rows()[:4].copy()
    x[0, -1], x[1, 700], x[2, 0] = np.nan, np.inf, np.nan  # in the last partial sub-block, mid-row, first
    out = summarize_rows(x, 8, [1.0], 1.0, np.sort(np.random.default_rng(0).random((4, 4)), axis=1))
    assert np.isnan(out["lse"][:3]).all() and np.isnan(out["ent"][:3]).all()
    assert np.isfinite(out["lse"][3]).all() and np.isfinite(out["ent"][3])
    bits = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(np.isnan(summarize_rows(bits, 8, [1.0], None, None)["lse"][:, 0]),
                                  [True, True, True, False])
