"""Stage 1's row pass: everything a cache keeps of a teacher's logit row, in one kernel.

For each (C,) row, parallel over rows, the row is read from memory once, block by block
(:data:`BLOCK` logits, float32 or bfloat16 read in place, into an L1 buffer). In each
block: the maxima of its sub-blocks (:data:`SUB` logits) and a NaN/+inf probe; then the
sums of ``exp((x - m) / T)`` at each cached temperature against the running maximum m
(rescaled when a later block raises it: an online logsumexp, float32 within a block,
float64 across), at the sampling temperature also ``exp(.) * (x - m) / T`` for the entropy
and each sub-block's sum. After the row: the K-th largest sub-block maximum bounds the K-th
largest value from below, so only the (about K) sub-blocks reaching it are read again, from
L2, into a min-heap of the K largest; the draws are the inverse CDF at the row's S sorted
uniforms, each walking only the sub-block it falls in.

What it gives, against the torch composition in :mod:`pipeline.representations`:

- logsumexp at each temperature and the entropy: the same definitions, summed in float32
  within a block and float64 across, so equal to float32 rounding (the entropy closer to
  float64's than torch's ``lse - E[z]``, which cancels on sharp rows);
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
from numba import types
from numba.extending import overload

from pipeline.kernels._base import FASTMATH, _i32_as_f32, is_finite, vexp

BLOCK = 512  # logits per block: read once into L1, summed against one running maximum
SUB = 64  # logits per sub-block: its maximum for the top-K, its sum for the draws (which walk only theirs)
LANES = 16  # one AVX-512 register of float32


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


def value(row, j):  # pragma: no cover - replaced by the overload in compiled code
    return row[j]


@overload(value, inline="always")
def _value(row, j):
    """A logit as float32: uint16 arrays hold bfloat16 bit patterns (the upper half of a
    float32's), read without an upcast copy of the batch."""
    if isinstance(row, types.Array) and row.dtype == types.uint16:
        return lambda row, j: _i32_as_f32(np.int32(row[j]) << np.int32(16))
    return lambda row, j: row[j]


@nb.njit(inline="always", fastmath=FASTMATH)
def _exp_sums(buf, a, end, m, it):
    """Over buf[a:end], the sums of e = exp(z) and of e * z, z = (x - m) * it."""
    total = np.float32(0.0)
    ws = np.float32(0.0)
    for j in range(a, end):
        z = max((buf[j] - m) * it, np.float32(-100.0))  # (clamped: a -inf logit adds 0 * a finite number, not NaN)
        e = vexp(z)
        total += e
        ws += e * z
    return total, ws


@nb.njit(parallel=True, cache=True, fastmath=FASTMATH)
def teacher_rows(x, k, inv_t, sample_col, uniforms, top_idx, top_val, lse, s_idx, s_cnt, ent, top1):
    """x (n, C) float32, or uint16 holding bfloat16 bits. k: top-K size (0: none). inv_t (U,)
    float32: 1/T per temperature. sample_col: the column of inv_t to sample and take the
    entropy at (-1: none). uniforms (n, S) float64 in [0, 1), each row sorted. Outputs:
    top_idx (n, K) int32, top_val (n, K) float32, lse (n, U) float32, s_idx / s_cnt (n, S)
    int32, ent (n,) float32, top1 (n,) int32."""
    n, c = x.shape
    n_t = inv_t.shape[0]
    n_s = uniforms.shape[1]
    n_b = (c + BLOCK - 1) // BLOCK
    n_sub_row = (c + SUB - 1) // SUB
    for i in nb.prange(n):
        row = x[i]
        buf = np.empty(BLOCK, np.float32)  # the block, as float32, in L1
        lane = np.empty(LANES, np.float32)
        sub_max = np.empty(n_sub_row, np.float32)
        hv = np.empty(max(k, 1), np.float32)  # min-heap of the K largest so far
        hi = np.empty(max(k, 1), np.int32)
        size = 0
        sums = np.zeros(max(n_t, 1))  # sum of exp((x - m) * inv_t) per temperature, m the running max
        part = np.zeros(n_sub_row, np.float32)  # sampling: each sub-block's sum, against its block's ref
        ref = np.full(n_b, -np.inf, np.float32)  # the running max when the block was summed
        m = np.float32(-np.inf)
        wsum = 0.0  # sum of e * z at the sampling temperature, for the entropy
        probe = np.float32(0.0)  # NaN when any value is NaN or infinite (0 * inf)
        arg = 0
        for blk in range(n_b):
            lo = blk * BLOCK
            w = min(c - lo, BLOCK)
            n_sub = (w + SUB - 1) // SUB
            g0 = blk * (BLOCK // SUB)  # the block's first sub-block in the row
            for j in range(w):  # read once, as float32 (1-D loops over the row vectorise; 2-D ones did not)
                buf[j] = value(row, lo + j)
            for j in range(w):
                probe += buf[j] * np.float32(0.0)
            bm = np.float32(-np.inf)
            for s in range(n_sub):  # sub-block maxima, lane-wise (a max reduction does not vectorise here)
                a = s * SUB
                for r in range(LANES):
                    lane[r] = -np.inf
                if a + SUB <= w:
                    for q in range(SUB // LANES):
                        for r in range(LANES):
                            v = buf[a + q * LANES + r]
                            lane[r] = v if v > lane[r] else lane[r]
                else:  # the row's tail
                    for j in range(a, w):
                        v = buf[j]
                        lane[0] = v if v > lane[0] else lane[0]
                sm = lane[0]
                for r in range(1, LANES):
                    sm = lane[r] if lane[r] > sm else sm
                sub_max[g0 + s] = sm
                bm = sm if sm > bm else bm
            if bm > m:  # a new maximum: the sums so far are rescaled to it
                if k == 0:
                    for j in range(w):  # the first index of the maximum
                        if buf[j] == bm:
                            arg = lo + j
                            break
                if m > -np.inf:
                    for t in range(n_t):
                        d = float((m - bm) * inv_t[t])
                        f = math.exp(d)
                        if t == sample_col:  # sum e'z' = f * sum e (z + d)
                            wsum = f * (wsum + d * sums[t])
                        sums[t] *= f
                m = bm
            if m == -np.inf:  # nothing but -inf so far: no mass
                continue
            for t in range(n_t):  # exp sums at each temperature, from L1 (float32 within a block)
                it = inv_t[t]
                total = np.float32(0.0)
                ws = np.float32(0.0)
                for s in range(n_sub):  # by sub-blocks: their sums let the draws skip to theirs
                    a = s * SUB
                    if a + SUB <= w:  # (a constant trip count vectorises)
                        sub, sub_ws = _exp_sums(buf, a, a + SUB, m, it)
                    else:
                        sub, sub_ws = _exp_sums(buf, a, w, m, it)
                    total += sub
                    ws += sub_ws
                    if t == sample_col:
                        part[g0 + s] = sub
                sums[t] += total
                if t == sample_col:
                    wsum += ws
                    ref[blk] = m
        if k > 0:  # top-K, from L2: the K-th largest sub-block maximum bounds the K-th largest
            # value from below, so only the (about K) sub-blocks reaching it are scanned
            floor = np.float32(-np.inf)
            if n_sub_row >= k:
                floor = np.partition(sub_max, n_sub_row - k)[n_sub_row - k]
            for g in range(n_sub_row):
                if not sub_max[g] >= floor:
                    continue
                for j in range(g * SUB, min(c, (g + 1) * SUB)):
                    v = value(row, j)
                    if v >= floor:
                        if size < k:
                            hv[size], hi[size] = v, j
                            _sift_up(hv, hi, size)
                            size += 1
                        elif v > hv[0]:  # equal values keep the earlier (lower) id
                            hv[0], hi[0] = v, j
                            _sift_down(hv, hi, 0, size)
        bad = False
        if probe != probe:  # rare: NaN or +inf make the row bad, a -inf logit is a class of probability 0
            for j in range(c):
                v = value(row, j)
                if v != v or v == np.inf:
                    bad = True
                    break
        for r in range(size - 1, -1, -1):  # pop the smallest to the back: largest first, ties by id
            top_val[i, r], top_idx[i, r] = hv[0], hi[0]
            hv[0], hi[0] = hv[r], hi[r]
            _sift_down(hv, hi, 0, r)
        top1[i] = top_idx[i, 0] if k > 0 else arg
        if bad or not is_finite(m):  # (all -inf: no distribution either)
            for t in range(n_t):
                lse[i, t] = np.nan
            ent[i] = np.nan
            for s in range(n_s):
                s_idx[i, s], s_cnt[i, s] = -1, 0
            continue
        for t in range(n_t):
            lse[i, t] = np.float32(m * inv_t[t] + math.log(sums[t]))
        if sample_col < 0:
            continue
        total_s = sums[sample_col]
        ent[i] = np.float32(max(math.log(total_s) - wsum / total_s, 0.0))
        if n_s == 0:
            continue
        # the draws: the inverse CDF at the row's sorted uniforms, walking only the blocks
        # they fall in: the first id whose running sum passes u * total
        it = inv_t[sample_col]
        pre = np.zeros(n_sub_row + 1)  # the running sum at each sub-block's start, against the final max
        for b in range(n_b):
            scale = math.exp(float((ref[b] - m) * it)) if ref[b] > -np.inf else 0.0  # one per block
            for g in range(b * (BLOCK // SUB), min(n_sub_row, (b + 1) * (BLOCK // SUB))):
                pre[g + 1] = pre[g] + part[g] * scale
        total_s = pre[n_sub_row]
        g, j, acc, e_j, have = 0, 0, 0.0, 0.0, False
        slot = -1
        for s in range(n_s):
            target = uniforms[i, s] * total_s
            if pre[g + 1] <= target:  # the draw lies in a later sub-block: jump to its start
                while g < n_sub_row - 1 and pre[g + 1] <= target:
                    g += 1
                if g * SUB > j:
                    j, acc, have = g * SUB, pre[g], False
            while True:
                if j >= c:  # rounding put the target past the sum: the last class that can be drawn
                    j = c - 1
                    while j > 0 and value(row, j) == -np.inf:
                        j -= 1
                    break
                if not have:
                    v = value(row, j)
                    e_j = 0.0 if v == -np.inf else vexp(max((v - m) * it, np.float32(-100.0)))
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
    """The fused row pass over (n, C) logits, float32 or bfloat16 bit patterns as uint16
    (read as they are, no float32 copy): ``top_idx``, ``top_val`` (k > 0), ``lse``
    (n, len(temperatures)), and with a sample temperature and (n, S) sorted uniforms
    ``s_idx``, ``s_cnt``, ``ent``; always ``top1``."""
    x = np.ascontiguousarray(x) if x.dtype == np.uint16 else np.ascontiguousarray(x, np.float32)
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
