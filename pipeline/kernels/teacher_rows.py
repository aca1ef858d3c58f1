"""Stage 1's row pass: everything a cache keeps of a teacher's logit row, in one kernel.

For each (C,) row (the caller splits the rows over threads), the row is read from memory
once, by sub-blocks of :data:`SUB` logits: their maxima (for the top-K), the sums of
``exp(x / T)`` at each cached temperature, and at the sampling temperature each sub-block's
sum and ``sum e * z`` for the entropy. Two ways, the same sums:

- a bfloat16 row (read as its bits, no float32 copy) gathers ``exp(x / T)`` from a table
  of all 65,536 patterns, in float64, with no maximum subtracted; its sub-block maxima are
  integer maxima of order keys. This holds while ``|max / T|`` stays under
  :data:`TABLE_RANGE` (float64's exp ends at 709); a row beyond it takes the other way.
- any other row (float32) goes block by block (:data:`BLOCK` logits into an L1 buffer):
  sub-block maxima, then the exp sums against the running maximum m (rescaled when a later
  block raises it: an online logsumexp, float32 within a block, float64 across).

After the sweep: the K-th largest sub-block maximum bounds the K-th largest value from
below, so only the (about K) sub-blocks reaching it are read again, from L2, for candidates;
each is one integer key (value order, then lower id), and the K largest keys are selected
and sorted. The draws are the inverse CDF at the row's S sorted uniforms, each walking only
the sub-block it falls in.

What it gives, against the torch composition in :mod:`pipeline.representations`:

- logsumexp at each temperature and the entropy: the same definitions, equal to float32
  rounding (the entropy closer to float64's than torch's ``lse - E[z]``, which cancels on
  sharp rows);
- top-K: the same ids and values, largest first; among equal values the lower id comes
  first (``torch.topk`` leaves the order of ties unspecified; -0 and +0 are equal);
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

from pipeline.kernels._base import FASTMATH, _f32_as_i32, _i32_as_f32, is_finite, vexp

BLOCK = 512  # logits per block of the float32 way: read once into L1, summed against one running maximum
SUB = 64  # logits per sub-block: its maximum for the top-K, its sum for the draws (which walk only theirs)
LANES = 16  # one AVX-512 register of float32
TABLE_RANGE = 600.0  # a bfloat16 row whose |max / T| is under this is summed from the exp table
MAX_CLASSES = 1 << 24  # a top-K candidate's key holds its id in 24 bits
ID_MASK = MAX_CLASSES - 1


def value(row, j):  # pragma: no cover - replaced by the overload in compiled code
    return row[j]


@overload(value, inline="always")
def _value(row, j):
    """A logit as float32: uint16 arrays hold bfloat16 bit patterns (the upper half of a
    float32's), read without an upcast copy of the batch."""
    if isinstance(row, types.Array) and row.dtype == types.uint16:
        return lambda row, j: _i32_as_f32(np.int32(row[j]) << np.int32(16))
    return lambda row, j: row[j]


def table_exp(tables, t, row, j):  # pragma: no cover
    return tables[t, row[j]]


@overload(table_exp, inline="always")
def _table_exp(tables, t, row, j):
    """exp(x / T) of a bfloat16 logit from its temperature's table (a float32 row never asks)."""
    if isinstance(row, types.Array) and row.dtype == types.uint16:
        return lambda tables, t, row, j: tables[t, row[j]]
    return lambda tables, t, row, j: np.nan


@nb.njit(inline="always")
def _key16(b):
    """A bfloat16 pattern's order key: larger value, larger key (-0 just below +0)."""
    return b ^ (np.uint16(0xFFFF) if b >= np.uint16(0x8000) else np.uint16(0x8000))


@nb.njit(inline="always")
def _unkey16(k):
    """The float32 value of a bfloat16 order key."""
    b = k ^ (np.uint16(0x8000) if k >= np.uint16(0x8000) else np.uint16(0xFFFF))
    return _i32_as_f32(np.int32(b) << np.int32(16))


@nb.njit(inline="always")
def _candidate(v, j):
    """One int64 per logit, ordered as the top-K is: by value, then the lower id first."""
    b = _f32_as_i32(v)
    b = np.int32(0) if b == np.int32(-0x80000000) else b  # -0 and +0 are one value
    k = b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))  # float order as signed integer order
    return ((np.int64(k) + np.int64(1 << 31)) << np.int64(24)) | (ID_MASK - np.int64(j))


@nb.njit(inline="always")
def _select(a, lo, hi, kth):
    """Rearrange a[lo:hi] in place so that a[kth] holds what sorting would put there, no
    larger values before it and no smaller ones after (quickselect, median-of-three)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi - 1]
        p = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi - 1
        while i <= j:
            while i < hi and a[i] < p:
                i += 1
            while j >= lo and a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j + 1
        elif kth >= i:
            lo = i
        else:
            return


@nb.njit
def _sift(a, lo, root, end):
    """Move a[lo + root] down the max-heap a[lo:lo + end] to where it belongs."""
    while 2 * root + 1 < end:
        child = 2 * root + 1
        if child + 1 < end and a[lo + child] < a[lo + child + 1]:
            child += 1
        if not a[lo + root] < a[lo + child]:
            return
        a[lo + root], a[lo + child] = a[lo + child], a[lo + root]
        root = child


@nb.njit
def _sort(a, lo, hi):
    """Sort a[lo:hi] ascending in place (heapsort: a few lines for Numba to compile, where
    ``np.sort`` costs seconds of its compile)."""
    n = hi - lo
    for root in range(n // 2 - 1, -1, -1):
        _sift(a, lo, root, n)
    for end in range(n - 1, 0, -1):
        a[lo], a[lo + end] = a[lo + end], a[lo]
        _sift(a, lo, 0, end)


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


@nb.njit(inline="always", fastmath=FASTMATH)
def _table_sums(tables, t, row, a, end, it):
    """Over row[a:end] (bfloat16 bits), the sums of e = exp(z) from the table and of e * z, z = x * it."""
    total = 0.0
    ws = 0.0
    for j in range(a, end):
        e = table_exp(tables, t, row, j)
        total += e
        ws += e * max(value(row, j) * it, np.float32(-1e30))  # (a -inf logit: 0 * -1e30, not NaN)
    return total, ws


def table_pass(row, tables, inv_t, sample_col, sub_max, part, sums):  # pragma: no cover
    raise NotImplementedError


@overload(table_pass)
def _table_pass(row, tables, inv_t, sample_col, sub_max, part, sums):
    """A bfloat16 row's sweep: sub-block maxima (integer maxima of order keys) and the exp
    sums from the tables, in float64 with nothing subtracted. Returns (max, sum of e * z at
    the sampling temperature)."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint16):
        return lambda row, tables, inv_t, sample_col, sub_max, part, sums: (np.float32(np.nan), 0.0)

    def impl(row, tables, inv_t, sample_col, sub_max, part, sums):
        c = row.shape[0]
        top = np.uint16(0)
        wsum = 0.0
        for t in range(tables.shape[0]):
            sums[t] = 0.0
        for g in range((c + SUB - 1) // SUB):
            a = g * SUB
            end = min(a + SUB, c)
            km = np.uint16(0)
            if end - a == SUB:  # (a constant trip count vectorises)
                for j in range(a, a + SUB):
                    key = _key16(row[j])
                    km = key if key > km else km
            else:
                for j in range(a, end):
                    key = _key16(row[j])
                    km = key if key > km else km
            sub_max[g] = _unkey16(km)
            top = km if km > top else top
            for t in range(tables.shape[0]):
                if end - a == SUB:
                    s, ws = _table_sums(tables, t, row, a, a + SUB, inv_t[t])
                else:
                    s, ws = _table_sums(tables, t, row, a, end, inv_t[t])
                sums[t] += s
                if t == sample_col:
                    part[g] = s
                    wsum += ws
        return _unkey16(top), wsum

    return impl


@nb.njit(fastmath=FASTMATH)
def _online_pass(row, inv_t, sample_col, sub_max, part, ref, sums):
    """Any row's sweep, block by block against the running maximum m: sub-block maxima and
    the exp sums of (x - m) / T. Returns (m, sum of e * z at the sampling temperature, a
    probe that is NaN when a value is NaN or infinite)."""
    c = row.shape[0]
    n_t = inv_t.shape[0]
    buf = np.empty(BLOCK, np.float32)  # the block, as float32, in L1
    lane = np.empty(LANES, np.float32)
    m = np.float32(-np.inf)
    wsum = 0.0
    probe = np.float32(0.0)
    for t in range(n_t):
        sums[t] = 0.0
    for b in range(ref.shape[0]):
        ref[b] = -np.inf
    for blk in range((c + BLOCK - 1) // BLOCK):
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
    return m, wsum, probe


@nb.njit
def _top_k(row, k, sub_max, top_idx, top_val, i):
    """The K largest values of the row, largest first, ties by lower id, from the sub-blocks
    whose maximum reaches the K-th largest sub-block maximum."""
    c = row.shape[0]
    n_sub = sub_max.shape[0]
    floor = np.float32(-np.inf)
    if n_sub > k:
        scratch = sub_max.copy()
        _select(scratch, 0, n_sub, n_sub - k)
        floor = scratch[n_sub - k]
    q = 0
    for g in range(n_sub):
        if sub_max[g] >= floor:
            q += 1
    cand = np.empty(q * SUB, np.int64)
    n = 0
    for g in range(n_sub):
        if not sub_max[g] >= floor:
            continue
        for j in range(g * SUB, min(c, (g + 1) * SUB)):
            v = value(row, j)
            cand[n] = _candidate(v, j)
            n += v >= floor  # (branch-free: most values are below)
    kk = min(k, n)  # (fewer only when NaN takes places: a row the caller refuses)
    if n > k:
        _select(cand, 0, n, n - k)
    _sort(cand, n - kk, n)
    top = cand[n - kk:n]
    for r in range(kk):
        j = ID_MASK - (top[kk - 1 - r] & ID_MASK)
        top_idx[i, r] = j
        top_val[i, r] = value(row, j)
    for r in range(kk, k):
        top_idx[i, r], top_val[i, r] = -1, np.nan


@nb.njit(nogil=True, cache=True, fastmath=FASTMATH)
def teacher_rows(x, k, inv_t, sample_col, uniforms, tables, top_idx, top_val, lse, s_idx, s_cnt, ent, top1):
    """x (n, C) float32, or uint16 holding bfloat16 bits. k: top-K size (0: none). inv_t (U,)
    float32: 1/T per temperature. sample_col: the column of inv_t to sample and take the
    entropy at (-1: none). uniforms (n, S) float64 in [0, 1), each row sorted. tables:
    :func:`pipeline.kernels.bf16_exp_tables` of inv_t for bfloat16 rows, (0, 0) otherwise. Outputs: top_idx
    (n, K) int32, top_val (n, K) float32, lse (n, U) float32, s_idx / s_cnt (n, S) int32,
    ent (n,) float32, top1 (n,) int32."""
    n, c = x.shape
    n_t = inv_t.shape[0]
    n_s = uniforms.shape[1]
    n_b = (c + BLOCK - 1) // BLOCK
    n_sub_row = (c + SUB - 1) // SUB
    for i in range(n):
        row = x[i]
        sub_max = np.empty(n_sub_row, np.float32)
        sums = np.zeros(max(n_t, 1))  # sum of exp((x - base) / T) per temperature
        part = np.zeros(n_sub_row)  # sampling: each sub-block's sum (the online pass: against its block's ref)
        ref = np.empty(n_b, np.float32)  # the online pass: the running maximum when a block was summed
        fast = False
        m = np.float32(np.nan)  # the row's maximum
        wsum = 0.0  # sum of e * z at the sampling temperature, for the entropy
        probe = np.float32(0.0)  # NaN when any value is NaN or infinite (0 * inf)
        if tables.shape[0] > 0:  # bfloat16: the tables, unless the row is beyond their range
            t_max, t_wsum = table_pass(row, tables, inv_t, sample_col, sub_max, part, sums)
            fast = is_finite(t_max)
            for t in range(n_t):
                if not abs(t_max * inv_t[t]) < TABLE_RANGE:
                    fast = False
            if fast:
                m, wsum = t_max, t_wsum
        if not fast:
            m, wsum, probe = _online_pass(row, inv_t, sample_col, sub_max, part, ref, sums)
        base = np.float32(0.0) if fast else m  # the sums are of exp((x - base) / T)
        if k > 0:
            _top_k(row, k, sub_max, top_idx, top_val, i)
            top1[i] = top_idx[i, 0]
        else:  # the first index of the maximum
            arg = 0
            for g in range(n_sub_row):
                if sub_max[g] == m:
                    for j in range(g * SUB, min(c, (g + 1) * SUB)):
                        if value(row, j) == m:
                            arg = j
                            break
                    break
            top1[i] = arg
        bad = False
        if probe != probe:  # rare: NaN or +inf make the row bad, a -inf logit is a class of probability 0
            for j in range(c):
                v = value(row, j)
                if v != v or v == np.inf:
                    bad = True
                    break
        if bad or not is_finite(m):  # (all -inf: no distribution either)
            for t in range(n_t):
                lse[i, t] = np.nan
            ent[i] = np.nan
            for s in range(n_s):
                s_idx[i, s], s_cnt[i, s] = -1, 0
            continue
        for t in range(n_t):
            lse[i, t] = np.float32(base * inv_t[t] + math.log(sums[t]))
        if sample_col < 0:
            continue
        total_s = sums[sample_col]
        ent[i] = np.float32(max(math.log(total_s) - wsum / total_s, 0.0))
        if n_s == 0:
            continue
        # the draws: the inverse CDF at the row's sorted uniforms, walking only the blocks
        # they fall in: the first id whose running sum passes u * total
        it = inv_t[sample_col]
        pre = np.zeros(n_sub_row + 1)  # the running sum at each sub-block's start, against the base
        for b in range(n_b):
            scale = 1.0 if fast else (math.exp(float((ref[b] - m) * it)) if ref[b] > -np.inf else 0.0)
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
                    if fast:
                        e_j = table_exp(tables, sample_col, row, j)
                    else:
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
