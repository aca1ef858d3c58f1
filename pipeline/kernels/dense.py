"""Dense distances between full teacher and student rows, forward and gradient fused in
one parallel pass per row. For teacher logits t, student logits s (one row of C), with
p = softmax(t/T) and q = softmax(s/T), everything in the log domain from max-shifted
logits (finite at +-1e4):

| name       | per-row loss                                   | d loss / d s_j                         |
|------------|------------------------------------------------|----------------------------------------|
| kl         | T^2 sum p (log p - log q)                      | T (q_j - p_j)                          |
| reverse_kl | T^2 sum q (log q - log p)                      | T q_j (d_j - sum_k q_k d_k), d = log q - log p |
| js         | T^2 [b KL(p||m) + (1-b) KL(q||m)], m = b p + (1-b) q | T q_j (g_j - sum_k q_k g_k), g = (1-b)(log q - log m) |
| mse        | mean_j (s_j - t_j)^2                           | 2 (s_j - t_j) / C                      |
| cosine     | 1 - s.t / (max(|s|, eps) max(|t|, eps))        | -(t/(|s||t|) - (s.t) s/(|s|^3 |t|))    |
| euclidean  | |s - t|_2                                      | (s - t) / |s - t| (0 where s = t)      |
| tv         | T^2 1/2 sum |q - p|                            | T q_j (g_j - sum_k q_k g_k), g = sign(q - p) / 2 |

``js`` is TRL's generalized Jensen-Shannon: b=0 is forward KL, b=1 reverse KL (exactly, as
special cases), b=0.5 the symmetric JS, bounded by T^2 log 2.

No exp is computed twice where it need not be: the softmax kernels keep the teacher's exps in ``grad`` and the
student's in a scratch row per block of rows (``blocks`` blocks: the caller passes a few per
thread), so JS and TV take two exps an element and reverse KL (whose teacher enters only
through its normaliser) keeps the student's in ``grad`` alone. KL takes three (see kl_rows).

Every kernel takes ``w`` (B,) row weights (0 skips the row: masked padding) and ``scale``,
writes ``loss[i] = w_i * L_i`` and ``grad[i] = scale * w_i * dL_i/ds``, and sets
``bad[i] = 1`` where the teacher row is not finite.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from pipeline.kernels._base import (
    FASTMATH,
    is_finite,
    like,
    row_max,
    shifted,
    tval,
    vexp,
    vlog,
    zero_row,
)

_EPS = 1e-8
_JIT = {"parallel": True, "cache": True, "fastmath": FASTMATH}


@nb.njit(inline="always")
def _blocks(n, c, blocks, dtype):
    """Rows in ``blocks`` contiguous blocks (a few per thread), each with a scratch row of C
    values: the softmax kernels keep the student's exps there, so no pass computes an exp
    twice. (The caller counts the threads: ``numba.get_num_threads`` in a kernel stops
    Numba caching it.)"""
    count = max(min(n, blocks), 1)
    return count, np.empty((count, c), dtype)


@nb.njit(inline="always", fastmath=FASTMATH)
def _softmax_start(s, t, table, inv_t, w, loss, grad, es, i):
    """The common start of the softmax kernels for row i: skip a masked row, else return
    the row maxima and the sums of exp((x - max)/T), with the teacher's exps left in
    ``grad[i]`` and the student's in ``es``. Returns (go, s_max, t_max, s_sum, t_sum)."""
    zero = like(s, 0.0)
    if w[i] == 0.0:
        zero_row(loss, grad, i)
        return False, zero, zero, zero, zero
    s_max, t_max = row_max(s, t, i, table)
    s_sum = like(s, 0.0)
    t_sum = like(s, 0.0)
    for j in range(s.shape[1]):
        e = vexp((tval(t, i, j, table) - t_max) * inv_t)
        grad[i, j] = e
        t_sum += e
        f = vexp((s[i, j] - s_max) * inv_t)
        es[j] = f
        s_sum += f
    return True, s_max, t_max, s_sum, t_sum


@nb.njit(inline="always", fastmath=FASTMATH)
def _centred_end(grad, es, i, g, g_bar, acc, value, loss, bad):
    """The end of a JS or TV row: the gradient T q_j (g_j - sum_k q_k g_k) from g_j kept in
    ``grad[i]``, the student's exps in ``es`` and ``g`` = scale w T / (sum of those exps);
    the row flagged where its sum ``acc`` is not finite (a NaN or infinite teacher value
    ends there); its loss ``value``."""
    for j in range(grad.shape[1]):
        grad[i, j] = g * es[j] * (grad[i, j] - g_bar)
    if not is_finite(acc):
        bad[i] = 1
    loss[i] = value


@nb.njit(**_JIT)
def kl_rows(s, t, table, temperature, w, scale, loss, grad, bad):
    """Three exps an element, not two: with the student's exps kept and log q used only in
    the row sum, LLVM distributes p over t - t_max and hoists p * t_max out of the sum even
    through :func:`shifted` in some compiles (a cached one here), and a one-hot teacher at
    +-1e4 loses 1e-4 in float32. Taking q from log q ties it to the gradient's store."""
    n, c = s.shape
    inv_t = like(s, 1.0 / temperature)
    T = like(s, temperature)
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        s_max, t_max = row_max(s, t, i, table)
        s_sum = like(s, 0.0)
        t_sum = like(s, 0.0)
        for j in range(c):  # the teacher's exps in grad
            e = vexp((tval(t, i, j, table) - t_max) * inv_t)
            grad[i, j] = e
            t_sum += e
            s_sum += vexp((s[i, j] - s_max) * inv_t)
        s_lse, t_lse = vlog(s_sum), vlog(t_sum)
        r_t = like(s, 1.0) / t_sum
        g = like(s, scale * w[i]) * T
        acc = like(s, 0.0)
        for j in range(c):
            p = grad[i, j] * r_t
            log_p = shifted(tval(t, i, j, table), t_max, inv_t) - t_lse
            log_q = shifted(s[i, j], s_max, inv_t) - s_lse
            acc += p * (log_p - log_q)
            grad[i, j] = g * (vexp(log_q) - p)
        if not is_finite(acc):  # a NaN or infinite teacher value ends here
            bad[i] = 1
        loss[i] = w[i] * T * T * acc


@nb.njit(**_JIT)
def reverse_kl_rows(s, t, table, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_t = like(s, 1.0 / temperature)
    T = like(s, temperature)
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        s_max, t_max = row_max(s, t, i, table)
        s_sum = like(s, 0.0)
        t_sum = like(s, 0.0)
        for j in range(c):  # the teacher enters only through its normaliser: the student's exps in grad
            t_sum += vexp((tval(t, i, j, table) - t_max) * inv_t)
            e = vexp((s[i, j] - s_max) * inv_t)
            grad[i, j] = e
            s_sum += e
        r_s = like(s, 1.0) / s_sum
        s_lse, t_lse = vlog(s_sum), vlog(t_sum)
        acc = like(s, 0.0)
        for j in range(c):  # KL_r = sum q (log q - log p)
            log_p = shifted(tval(t, i, j, table), t_max, inv_t) - t_lse
            log_q = shifted(s[i, j], s_max, inv_t) - s_lse
            acc += grad[i, j] * (log_q - log_p)
        acc *= r_s
        g = like(s, scale * w[i]) * T * r_s
        for j in range(c):
            log_p = shifted(tval(t, i, j, table), t_max, inv_t) - t_lse
            log_q = shifted(s[i, j], s_max, inv_t) - s_lse
            grad[i, j] = g * grad[i, j] * (log_q - log_p - acc)
        if not is_finite(acc):  # a NaN or infinite teacher value ends here
            bad[i] = 1
        loss[i] = w[i] * T * T * acc


@nb.njit(**_JIT)
def js_rows(s, t, table, temperature, beta, blocks, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_t = like(s, 1.0 / temperature)
    T = like(s, temperature)
    b = like(s, beta)
    b1 = like(s, 1.0 - beta)
    count, scratch = _blocks(n, c, blocks, s.dtype)
    for blk in nb.prange(count):
        es = scratch[blk]
        for i in range(blk * n // count, (blk + 1) * n // count):
            go, s_max, t_max, s_sum, t_sum = _softmax_start(s, t, table, inv_t, w, loss, grad, es, i)
            if not go:
                continue
            s_lse, t_lse = vlog(s_sum), vlog(t_sum)
            r_t, r_s = like(s, 1.0) / t_sum, like(s, 1.0) / s_sum
            acc = like(s, 0.0)
            g_bar = like(s, 0.0)
            for j in range(c):  # g_j = (1-b)(log q - log m) kept in grad; sum q g
                p = grad[i, j] * r_t
                q = es[j] * r_s
                log_p = shifted(tval(t, i, j, table), t_max, inv_t) - t_lse
                log_q = shifted(s[i, j], s_max, inv_t) - s_lse
                log_m = vlog(max(b * p + b1 * q, like(s, 1e-37)))  # m below 1e-37: p and q add nothing
                acc += b * p * (log_p - log_m) + b1 * q * (log_q - log_m)
                gj = b1 * (log_q - log_m)
                grad[i, j] = gj
                g_bar += q * gj
            _centred_end(grad, es, i, like(s, scale * w[i]) * T * r_s, g_bar, acc, w[i] * T * T * acc, loss, bad)


@nb.njit(**_JIT)
def mse_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_c = like(s, 1.0 / c)
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        acc = like(s, 0.0)
        g = like(s, scale * w[i] * 2.0 / c)
        for j in range(c):
            d = s[i, j] - tval(t, i, j, table)
            acc += d * d
            grad[i, j] = g * d
        if not is_finite(acc):
            bad[i] = 1
        loss[i] = w[i] * acc * inv_c


@nb.njit(**_JIT)
def cosine_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        dot = like(s, 0.0)
        ss = like(s, 0.0)
        tt = like(s, 0.0)
        for j in range(c):
            tj = tval(t, i, j, table)
            dot += s[i, j] * tj
            ss += s[i, j] * s[i, j]
            tt += tj * tj
        if not is_finite(tt):
            bad[i] = 1
        ns = max(math.sqrt(ss), _EPS)
        nt = max(math.sqrt(tt), _EPS)
        cos = dot / (ns * nt)
        a = like(s, -scale * w[i] / (ns * nt))
        bb = like(s, scale * w[i] * cos / (ns * ns) if ss > 0 else 0.0)
        for j in range(c):
            grad[i, j] = a * tval(t, i, j, table) + bb * s[i, j]
        loss[i] = w[i] * (1.0 - cos)


@nb.njit(**_JIT)
def euclidean_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        acc = like(s, 0.0)
        for j in range(c):  # s - t kept in grad: the second pass scales it in cache, not reading s and t again
            d = s[i, j] - tval(t, i, j, table)
            acc += d * d
            grad[i, j] = d
        if not is_finite(acc):
            bad[i] = 1
        dist = math.sqrt(acc)
        g = like(s, scale * w[i] / dist if dist > 0 else 0.0)
        for j in range(c):
            grad[i, j] *= g
        loss[i] = w[i] * dist


@nb.njit(**_JIT)
def tv_rows(s, t, table, temperature, blocks, w, scale, loss, grad, bad):
    """Total variation T^2 * 1/2 sum |q - p|; its gradient T q_j (g_j - sum_k q_k g_k) with
    g = sign(q - p) / 2 (0 where q = p: the subgradient torch's abs takes)."""
    n, c = s.shape
    inv_t = like(s, 1.0 / temperature)
    T = like(s, temperature)
    half = like(s, 0.5)
    count, scratch = _blocks(n, c, blocks, s.dtype)
    for blk in nb.prange(count):
        es = scratch[blk]
        for i in range(blk * n // count, (blk + 1) * n // count):
            go, s_max, t_max, s_sum, t_sum = _softmax_start(s, t, table, inv_t, w, loss, grad, es, i)
            if not go:
                continue
            r_t = like(s, 1.0) / t_sum
            r_s = like(s, 1.0) / s_sum
            acc = like(s, 0.0)
            g_bar = like(s, 0.0)
            for j in range(c):  # g_j kept in grad; sum q g
                q = es[j] * r_s
                d = q - grad[i, j] * r_t
                acc += abs(d)
                gj = half if d > 0 else (-half if d < 0 else like(s, 0.0))
                grad[i, j] = gj
                g_bar += q * gj
            _centred_end(grad, es, i, like(s, scale * w[i]) * T * r_s, g_bar, acc, w[i] * T * T * half * acc, loss,
                         bad)
