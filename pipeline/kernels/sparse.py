"""Sparse-target distances: the teacher is known on a few classes, the student's row is
full (C logits). Forward and gradient fused, parallel over rows.

``topk_kl``: the teacher's K largest logits v with ids k and the exact logsumexp of its
whole row at T give p_k = exp(v/T - lse_T) and the tail's mass p_tail = 1 - sum p_k. The
student is coarsened the same way: q_k and q_tail = sum of q over the other classes
(summed directly, no 1 - sum cancellation). The loss is the KL between these K+1-bucket
distributions, T^2 sum_b P_b log(P_b / Q_b), whose gradient is
T (q_j - p_j) on the K classes and T q_j (1 - p_tail / q_tail) on the others.

``sampled_kl`` (RS-KD): S draws from p_T with counts c_j give w_j = c_j / S, E[w] = p. The
loss T^2 [sum_j w_j (-log q_j) - H(p_T)] is an unbiased estimate of T^2 KL(p || q) (the
cached entropy H makes it a KL, not a cross-entropy), and T (q_j - w_j) of its gradient.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from pipeline.kernels._base import FASTMATH, is_finite, like, vexp, vlog

_JIT = {"parallel": True, "cache": True, "fastmath": FASTMATH}


@nb.njit(**_JIT)
def topk_kl_rows(s, idx, val, lse, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    k = idx.shape[1]
    inv_t = like(s, 1.0 / temperature)
    for i in nb.prange(n):
        if w[i] == 0.0 or not is_finite(lse[i]):
            bad[i] = w[i] != 0.0
            loss[i] = 0.0
            for j in range(c):
                grad[i, j] = 0.0
            continue
        for j in range(c):
            grad[i, j] = np.nan  # NaN marks "not one of the teacher's K": filled last
        s_max = like(s, -np.inf)
        for j in range(c):
            s_max = max(s_max, s[i, j])
        for r in range(k):
            grad[i, idx[i, r]] = 0.0
        total = like(s, 0.0)
        tail = like(s, 0.0)
        for j in range(c):
            e = vexp((s[i, j] - s_max) * inv_t)
            total += e
            if not is_finite(grad[i, j]):
                tail += e
        s_lse = vlog(total)
        q_tail = tail / total
        p_tail = like(s, 1.0)
        acc = like(s, 0.0)
        g = like(s, scale * w[i] * temperature)
        for r in range(k):
            log_p = val[i, r] * inv_t - lse[i]
            p = vexp(log_p)
            if not is_finite(log_p):
                bad[i] = 1
            log_q = (s[i, idx[i, r]] - s_max) * inv_t - s_lse
            p_tail -= p
            acc += p * (log_p - log_q)
            grad[i, idx[i, r]] = g * (vexp(log_q) - p)
        ratio = like(s, 0.0)
        if p_tail > 0.0 and q_tail > 0.0:
            acc += p_tail * (vlog(p_tail) - vlog(q_tail))
            ratio = p_tail / q_tail
        f = g * (1.0 - ratio)
        for j in range(c):
            if not is_finite(grad[i, j]):
                grad[i, j] = f * vexp((s[i, j] - s_max) * inv_t - s_lse)
        loss[i] = w[i] * temperature * temperature * acc


@nb.njit(**_JIT)
def sampled_kl_rows(s, idx, cnt, ent, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    m = idx.shape[1]
    inv_t = like(s, 1.0 / temperature)
    for i in nb.prange(n):
        if w[i] == 0.0:
            loss[i] = 0.0
            for j in range(c):
                grad[i, j] = 0.0
            continue
        s_max = like(s, -np.inf)
        for j in range(c):
            s_max = max(s_max, s[i, j])
        total = like(s, 0.0)
        for j in range(c):
            total += vexp((s[i, j] - s_max) * inv_t)
        s_lse = vlog(total)
        g = like(s, scale * w[i] * temperature)
        for j in range(c):
            grad[i, j] = g * vexp((s[i, j] - s_max) * inv_t - s_lse)
        draws = 0.0
        for r in range(m):
            draws += cnt[i, r]
        if draws == 0.0 or not is_finite(ent[i]):
            bad[i] = 1
            loss[i] = 0.0
            continue
        ce = 0.0
        for r in range(m):
            if cnt[i, r] == 0:
                continue
            wj = cnt[i, r] / draws
            j = idx[i, r]
            ce -= wj * ((s[i, j] - s_max) * inv_t - s_lse)
            grad[i, j] -= g * wj
        loss[i] = w[i] * temperature * temperature * (ce - ent[i])
