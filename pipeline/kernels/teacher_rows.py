"""Stage 1's row pass: everything a cache keeps of a teacher's logit row, in one kernel.

For each (C,) row, parallel over rows: a first sweep finds the maximum of each of K
blocks (vectorised) and flags NaN or +inf; the smallest block maximum bounds the K-th
largest value, so a scan keeps the K largest (ids and values) in a min-heap that only
values at or above it enter; a second sweep sums ``exp((x - max) / T)`` at each cached
temperature (float64 sums) and, at the sampling temperature, ``exp(.) * x / T`` for the
entropy and the sums of blocks of :data:`BLOCK` values; a third, only for sampled caches,
draws S ids as the inverse CDF at the row's sorted uniforms, walking only the blocks they
fall in. The later sweeps mostly find the row in cache (a 49,152-wide float32 row is 192 KiB).

What it gives, against the torch composition in :mod:`pipeline.representations`:

- logsumexp at each temperature and the entropy: the same definitions, float64 sums
  (torch sums in float32), so equal to float32 rounding;
- top-K: the same ids and values, largest first; among equal values the lower id comes
  first (``torch.topk`` leaves the order of ties unspecified);
- draws: from the same distribution, the inverse CDF at S sorted uniforms that
  ``torch.rand`` gives from the shard's seeded generator, so a resumed capture draws the
  same ids again; not the ids ``torch.multinomial`` would draw from the same seed (its
  sampler is internal to torch). Distinct ids ascending, with their counts, -1/0 padding;
- top1: the first index of the maximum, as ``argmax``;
- a row holding NaN or +inf gets a NaN logsumexp and entropy, which the caller refuses;
  a -inf logit is a class of probability 0, never drawn.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from pipeline.kernels._base import FASTMATH, is_finite, vexp

BLOCK = 512  # sampling: logits per block of the running sum (sweep 3 walks only the blocks drawn in)


@nb.njit(inline="always")
def _less(va, ia, vb, ib):
    """Heap order: a below b when smaller, or equal with a larger id (the lower id is kept)."""
    return va < vb or (va == vb and ia > ib)


@nb.njit(inline="always")
def _sift_down(hv, hi, pos, size):
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        if left + 1 < size and _less(hv[left + 1], hi[left + 1], hv[left], hi[left]):
            child = left + 1
        if _less(hv[child], hi[child], hv[pos], hi[pos]):
            hv[pos], hv[child] = hv[child], hv[pos]
            hi[pos], hi[child] = hi[child], hi[pos]
            pos = child
        else:
            return


@nb.njit(inline="always")
def _sift_up(hv, hi, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if _less(hv[pos], hi[pos], hv[parent], hi[parent]):
            hv[pos], hv[parent] = hv[parent], hv[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        else:
            return


@nb.njit(parallel=True, cache=True, fastmath=FASTMATH)
def teacher_rows(x, k, inv_t, sample_col, uniforms, top_idx, top_val, lse, s_idx, s_cnt, ent, top1):
    """x (n, C) float32. k: top-K size (0: none). inv_t (U,) float32: 1/T per temperature.
    sample_col: the column of inv_t to sample and take the entropy at (-1: none).
    uniforms (n, S) float64 in [0, 1), each row sorted. Outputs: top_idx (n, K) int32,
    top_val (n, K) float32, lse (n, U) float32, s_idx / s_cnt (n, S) int32, ent (n,)
    float32, top1 (n,) int32."""
    n, c = x.shape
    n_t = inv_t.shape[0]
    n_s = uniforms.shape[1]
    for i in nb.prange(n):
        hv = np.empty(max(k, 1), np.float32)
        hi = np.empty(max(k, 1), np.int32)
        size = 0
        # sweep 1: the maximum of each of K blocks (vectorised); the smallest of them is a
        # lower bound of the K-th largest value, so only values at or above it enter the heap
        n_blk = max(min(k, c), 1)
        width = (c + n_blk - 1) // n_blk
        m = np.float32(-np.inf)
        floor = np.float32(np.inf)
        probe = np.float32(0.0)  # NaN when any value is NaN or infinite (0 * inf)
        for blk in range(n_blk):
            bm = np.float32(-np.inf)
            for j in range(blk * width, min(c, (blk + 1) * width)):
                v = x[i, j]
                bm = max(bm, v)
                probe += v * np.float32(0.0)
            m = max(m, bm)
            floor = min(floor, bm)
        bad = False
        if probe != probe:  # rare: NaN or +inf make the row bad, a -inf logit is a class of probability 0
            for j in range(c):
                v = x[i, j]
                if v != v or v == np.inf:
                    bad = True
                    break
        if k > 0:
            for j in range(c):
                v = x[i, j]
                if v >= floor:
                    if size < k:
                        hv[size], hi[size] = v, j
                        _sift_up(hv, hi, size)
                        size += 1
                    elif v > hv[0]:  # equal values keep the earlier (lower) id
                        hv[0], hi[0] = v, j
                        _sift_down(hv, hi, 0, size)
        else:
            arg = 0
            for j in range(c):  # the first index of the maximum
                if x[i, j] == m:
                    arg = j
                    break
            top1[i] = arg
        for r in range(size - 1, -1, -1):  # pop the smallest to the back: largest first, ties by id
            top_val[i, r], top_idx[i, r] = hv[0], hi[0]
            hv[0], hi[0] = hv[r], hi[r]
            _sift_down(hv, hi, 0, r)
        if k > 0:
            top1[i] = top_idx[i, 0]
        if bad or not is_finite(m):  # (all -inf: no distribution either)
            for t in range(n_t):
                lse[i, t] = np.nan
            ent[i] = np.nan
            for s in range(n_s):
                s_idx[i, s], s_cnt[i, s] = -1, 0
            continue
        total_s = 0.0
        n_b = (c + BLOCK - 1) // BLOCK
        pre = np.zeros(n_b + 1)  # sampling: the running sum at each block's start
        for t in range(n_t):  # sweep 2: sums at each temperature
            it = inv_t[t]
            total = 0.0
            if t == sample_col:
                wsum = 0.0
                for blk in range(n_b):  # by blocks: their sums let sweep 3 skip to the block of a draw
                    part = 0.0
                    for j in range(blk * BLOCK, min(c, (blk + 1) * BLOCK)):
                        # (z clamped: a -inf logit adds 0 * a finite number, not NaN)
                        z = max((x[i, j] - m) * it, np.float32(-100.0))
                        e = vexp(z)
                        part += e
                        wsum += e * z
                    total += part
                    pre[blk + 1] = total
                ent[i] = np.float32(max(math.log(total) - wsum / total, 0.0))
                total_s = total
            else:
                for j in range(c):
                    total += vexp((x[i, j] - m) * it)
            lse[i, t] = np.float32(m * it + math.log(total))
        if n_s == 0:
            continue
        # sweep 3: the inverse CDF at the row's sorted uniforms, walking only the blocks they
        # fall in: the first id whose running sum passes u * total
        it = inv_t[sample_col]
        blk, j, acc, e_j, have = 0, 0, 0.0, 0.0, False
        slot = -1
        for s in range(n_s):
            target = uniforms[i, s] * total_s
            if pre[blk + 1] <= target:  # the draw lies in a later block: jump to its start
                while blk < n_b - 1 and pre[blk + 1] <= target:
                    blk += 1
                if blk * BLOCK > j:
                    j, acc, have = blk * BLOCK, pre[blk], False
            while True:
                if j >= c:  # rounding put the target past the sum: the last class that can be drawn
                    j = c - 1
                    while j > 0 and x[i, j] == -np.inf:
                        j -= 1
                    break
                if not have:
                    e_j = 0.0 if x[i, j] == -np.inf else vexp(max((x[i, j] - m) * it, np.float32(-100.0)))
                    have = True
                if acc + e_j > target:
                    break
                acc += e_j
                j += 1
                have = False
            if slot < 0 or s_idx[i, slot] != j:
                slot += 1
                s_idx[i, slot], s_cnt[i, slot] = j, 0
            s_cnt[i, slot] += 1
        for r in range(slot + 1, n_s):
            s_idx[i, r], s_cnt[i, r] = -1, 0


def summarize_rows(x: np.ndarray, k: int, temperatures: list[float], sample_temperature: float | None,
                   uniforms: np.ndarray | None) -> dict[str, np.ndarray]:
    """The fused row pass over (n, C) float32 logits: ``top_idx``, ``top_val`` (k > 0),
    ``lse`` (n, len(temperatures)), and with a sample temperature and (n, S) sorted uniforms
    ``s_idx``, ``s_cnt``, ``ent``; always ``top1``."""
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    temps = list(dict.fromkeys([*temperatures, *([sample_temperature] if sample_temperature else [])]))
    inv_t = np.array([1.0 / t for t in temps], np.float32)
    col = temps.index(sample_temperature) if sample_temperature else -1
    u = np.zeros((n, 0)) if uniforms is None else np.ascontiguousarray(uniforms, np.float64)
    out = {"top_idx": np.empty((n, k), np.int32), "top_val": np.empty((n, k), np.float32),
           "lse": np.empty((n, len(temps)), np.float32), "s_idx": np.empty(u.shape, np.int32),
           "s_cnt": np.empty(u.shape, np.int32), "ent": np.zeros(n, np.float32), "top1": np.empty(n, np.int32)}
    teacher_rows(x, k, inv_t, col, u, out["top_idx"], out["top_val"], out["lse"], out["s_idx"], out["s_cnt"],
                 out["ent"], out["top1"])
    out["lse"] = out["lse"][:, [temps.index(t) for t in temperatures]]
    return out
