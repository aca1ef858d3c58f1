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

``js`` is TRL's generalized Jensen-Shannon: b=0 is forward KL, b=1 reverse KL (exactly, as
special cases), b=0.5 the symmetric JS, bounded by T^2 log 2.

Every kernel takes ``w`` (B,) row weights (0 skips the row: masked padding) and ``scale``,
writes ``loss[i] = w_i * L_i`` and ``grad[i] = scale * w_i * dL_i/ds``, and sets
``bad[i] = 1`` where the teacher row is not finite.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from pipeline.kernels._base import row_max, tval

_EPS = 1e-8


@nb.njit(inline="always")
def _zero_row(loss, grad, i):
    loss[i] = 0.0
    for j in range(grad.shape[1]):
        grad[i, j] = 0.0


@nb.njit(inline="always")
def _lse_pair(s, t, i, table, inv_t, s_max, t_max):
    s_sum = 0.0
    t_sum = 0.0
    for j in range(s.shape[1]):
        s_sum += math.exp((s[i, j] - s_max) * inv_t)
        t_sum += math.exp((tval(t, i, j, table) - t_max) * inv_t)
    return math.log(s_sum), math.log(t_sum)


@nb.njit(parallel=True, cache=True)
def kl_rows(s, t, table, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_t = 1.0 / temperature
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        s_max, t_max = row_max(s, t, i, table)
        if not math.isfinite(t_max):
            bad[i] = 1
            _zero_row(loss, grad, i)
            continue
        s_lse, t_lse = _lse_pair(s, t, i, table, inv_t, s_max, t_max)
        acc = 0.0
        g = scale * w[i] * temperature
        for j in range(c):
            log_p = (tval(t, i, j, table) - t_max) * inv_t - t_lse
            log_q = (s[i, j] - s_max) * inv_t - s_lse
            p = math.exp(log_p)
            acc += p * (log_p - log_q)
            grad[i, j] = g * (math.exp(log_q) - p)
        loss[i] = w[i] * temperature * temperature * acc


@nb.njit(parallel=True, cache=True)
def reverse_kl_rows(s, t, table, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_t = 1.0 / temperature
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        s_max, t_max = row_max(s, t, i, table)
        if not math.isfinite(t_max):
            bad[i] = 1
            _zero_row(loss, grad, i)
            continue
        s_lse, t_lse = _lse_pair(s, t, i, table, inv_t, s_max, t_max)
        acc = 0.0
        for j in range(c):  # pass 1: d_j = log q_j - log p_j kept in grad; KL_r = sum q d
            log_p = (tval(t, i, j, table) - t_max) * inv_t - t_lse
            log_q = (s[i, j] - s_max) * inv_t - s_lse
            d = log_q - log_p
            grad[i, j] = d
            acc += math.exp(log_q) * d
        g = scale * w[i] * temperature
        for j in range(c):
            q = math.exp((s[i, j] - s_max) * inv_t - s_lse)
            grad[i, j] = g * q * (grad[i, j] - acc)
        loss[i] = w[i] * temperature * temperature * acc


@nb.njit(parallel=True, cache=True)
def js_rows(s, t, table, temperature, beta, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_t = 1.0 / temperature
    log_b = math.log(beta)
    log_1b = math.log(1.0 - beta)
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        s_max, t_max = row_max(s, t, i, table)
        if not math.isfinite(t_max):
            bad[i] = 1
            _zero_row(loss, grad, i)
            continue
        s_lse, t_lse = _lse_pair(s, t, i, table, inv_t, s_max, t_max)
        acc = 0.0
        g_bar = 0.0
        for j in range(c):  # pass 1: g_j = (1-b)(log q - log m) kept in grad, sum q g
            log_p = (tval(t, i, j, table) - t_max) * inv_t - t_lse
            log_q = (s[i, j] - s_max) * inv_t - s_lse
            a = log_b + log_p
            b = log_1b + log_q
            hi = max(a, b)
            log_m = hi + math.log(math.exp(a - hi) + math.exp(b - hi))
            p = math.exp(log_p)
            q = math.exp(log_q)
            acc += beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
            gj = (1.0 - beta) * (log_q - log_m)
            grad[i, j] = gj
            g_bar += q * gj
        g = scale * w[i] * temperature
        for j in range(c):
            q = math.exp((s[i, j] - s_max) * inv_t - s_lse)
            grad[i, j] = g * q * (grad[i, j] - g_bar)
        loss[i] = w[i] * temperature * temperature * acc


@nb.njit(parallel=True, cache=True)
def mse_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    inv_c = 1.0 / c
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        acc = 0.0
        g = scale * w[i] * 2.0 * inv_c
        for j in range(c):
            d = s[i, j] - tval(t, i, j, table)
            acc += d * d
            grad[i, j] = g * d
        if not math.isfinite(acc):
            bad[i] = 1
        loss[i] = w[i] * acc * inv_c


@nb.njit(parallel=True, cache=True)
def cosine_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        dot = 0.0
        ss = 0.0
        tt = 0.0
        for j in range(c):
            tj = tval(t, i, j, table)
            dot += s[i, j] * tj
            ss += s[i, j] * s[i, j]
            tt += tj * tj
        if not math.isfinite(tt):
            bad[i] = 1
        ns = max(math.sqrt(ss), _EPS)
        nt = max(math.sqrt(tt), _EPS)
        cos = dot / (ns * nt)
        a = -scale * w[i] / (ns * nt)
        b = scale * w[i] * cos / (ns * ns) if ss > 0 else 0.0
        for j in range(c):
            grad[i, j] = a * tval(t, i, j, table) + b * s[i, j]
        loss[i] = w[i] * (1.0 - cos)


@nb.njit(parallel=True, cache=True)
def euclidean_rows(s, t, table, w, scale, loss, grad, bad):
    n, c = s.shape
    for i in nb.prange(n):
        if w[i] == 0.0:
            _zero_row(loss, grad, i)
            continue
        acc = 0.0
        for j in range(c):
            d = s[i, j] - tval(t, i, j, table)
            acc += d * d
        if not math.isfinite(acc):
            bad[i] = 1
        dist = math.sqrt(acc)
        g = scale * w[i] / dist if dist > 0 else 0.0
        for j in range(c):
            grad[i, j] = g * (s[i, j] - tval(t, i, j, table))
        loss[i] = w[i] * dist
