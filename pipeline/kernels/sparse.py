"""Sparse-target distances: the teacher is known on a few classes, the student's row is
full (C logits). Forward and gradient fused, parallel over rows.

``topk_kl``: the teacher's K largest logits v with ids k (an id of -1 is padding: an
adaptive row holds fewer, and the entry is skipped) and the exact logsumexp of its
whole row at T give p_k = exp(v/T - lse_T) and the tail's mass p_tail = 1 - sum p_k. The
student is coarsened the same way: q_k and q_tail = the student's mass outside the K
(summed directly over the other classes: no 1 - sum cancellation). The loss is the KL between these K+1-bucket
distributions, T^2 sum_b P_b log(P_b / Q_b), whose gradient is
T (q_j - p_j) on the K classes and T q_j (1 - p_tail / q_tail) on the others.

``sampled_kl`` (RS-KD): S draws from p_T with counts c_j give w_j = c_j / S, E[w] = p. The
loss T^2 [sum_j w_j (-log q_j) - H(p_T)] is an unbiased estimate of T^2 KL(p || q) (the
cached entropy H makes it a KL, not a cross-entropy), and T (q_j - w_j) of its gradient.
A drawn id outside the student's classes sets ``bad[i] = 2`` (a teacher row that is not
finite, or holds no draws, sets 1).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from pipeline.kernels._base import (
    FASTMATH,
    is_finite,
    like,
    max_and_exps,
    max_and_total,
    vexp,
    vlog,
    zero_row,
)

_JIT = {"parallel": True, "cache": True, "fastmath": FASTMATH}
TINY = 1e-37  # pipeline.losses.TINY: the skewed KLs' floor under a mixture


@nb.njit(inline="always", fastmath=FASTMATH)
def _exps_and_rest(s, i, idx, inv_t, grad):
    """Row i's maximum, softmax normaliser and the sum of its exps outside the entries
    ``idx[i]`` (-1: none), summed directly (no 1 - sum(q_k) cancellation); the exps are left
    in ``grad[i]``, the entries' marked -1 (the caller overwrites them)."""
    s_max, total = max_and_exps(s, i, inv_t, grad)
    for r in range(idx.shape[1]):
        if idx[i, r] >= 0:
            grad[i, idx[i, r]] = -like(s, 1.0)
    rest = like(s, 0.0)
    for j in range(s.shape[1]):
        rest += max(grad[i, j], like(s, 0.0))
    return s_max, total, rest


@nb.njit(**_JIT)
def topk_kl_rows(s, idx, val, lse, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    k = idx.shape[1]
    inv_t = like(s, 1.0 / temperature)
    for i in nb.prange(n):
        if w[i] == 0.0 or not is_finite(lse[i]):
            bad[i] = w[i] != 0.0
            zero_row(loss, grad, i)
            continue
        s_max, total, tail = _exps_and_rest(s, i, idx, inv_t, grad)
        r_total = like(s, 1.0) / total
        q_tail = tail * r_total  # summed directly: no 1 - sum(q_k) cancellation
        s_lse = vlog(total)
        p_tail = like(s, 1.0)
        acc = like(s, 0.0)
        for r in range(k):
            if idx[i, r] < 0:
                continue
            log_p = val[i, r] * inv_t - lse[i]
            if not is_finite(log_p):
                bad[i] = 1
            p_tail -= vexp(log_p)
        ratio = like(s, 0.0)
        if p_tail > 0.0 and q_tail > 0.0:
            acc += p_tail * (vlog(p_tail) - vlog(q_tail))
            ratio = p_tail / q_tail
        g = like(s, scale * w[i] * temperature)
        f = g * (like(s, 1.0) - ratio) * r_total
        for j in range(c):  # the tail's gradient everywhere, then the K classes overwritten
            grad[i, j] = f * grad[i, j]
        for r in range(k):
            j = idx[i, r]
            if j < 0:
                continue
            log_p = val[i, r] * inv_t - lse[i]
            log_q = (s[i, j] - s_max) * inv_t - s_lse
            p = vexp(log_p)
            acc += p * (log_p - log_q)
            grad[i, j] = g * (vexp(log_q) - p)
        loss[i] = w[i] * temperature * temperature * acc


@nb.njit(**_JIT)
def sampled_kl_rows(s, idx, cnt, ent, temperature, w, scale, loss, grad, bad):
    n, c = s.shape
    m = idx.shape[1]
    inv_t = like(s, 1.0 / temperature)
    for i in nb.prange(n):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        s_max, total = max_and_exps(s, i, inv_t, grad)
        s_lse = vlog(total)
        g = like(s, scale * w[i] * temperature)
        f = g / total
        for j in range(c):
            grad[i, j] *= f
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
            j = idx[i, r]
            if j < 0 or j >= c:  # not a class of this student: the caller says so
                bad[i] = 2
                continue
            wj = cnt[i, r] / draws
            ce -= wj * ((s[i, j] - s_max) * inv_t - s_lse)
            grad[i, j] -= g * wj
        loss[i] = w[i] * temperature * temperature * (ce - ent[i])


@nb.njit(**_JIT)
def ce_rows(s, labels, w, loss, grad, add):
    """Cross-entropy to ``labels`` (-1: none) at T = 1, weighted by ``w``: the loss per row,
    and ``w (softmax(s) - onehot)`` written to ``grad`` (added to it with ``add``: a
    distance's gradient of the same rows already there)."""
    n, c = s.shape
    for i in nb.prange(n):
        y = labels[i]
        if w[i] == 0.0 or y < 0:
            loss[i] = 0.0
            if not add:
                for j in range(c):
                    grad[i, j] = 0.0
            continue
        s_max, total = max_and_total(s, i, like(s, 1.0))
        g = like(s, w[i]) / total
        if add:
            for j in range(c):
                grad[i, j] += g * vexp(s[i, j] - s_max)
        else:
            for j in range(c):
                grad[i, j] = g * vexp(s[i, j] - s_max)
        grad[i, y] -= like(s, w[i])
        loss[i] = w[i] * (vlog(total) + s_max - s[i, y])


@nb.njit(inline="always", fastmath=FASTMATH)
def _skew_bucket(s, p, q, b, reverse):
    """One bucket of a skewed KL, teacher mass p, student mass q, skew b: its term of the
    loss and G = d loss / d q. Forward, KL(P || b P + (1-b) Q): p log(p / m), m = b p + (1-b) q,
    G = -(1-b) p / m. Reverse, KL(Q || b Q + (1-b) P): q log(q / m), m = b q + (1-b) p,
    G = log(q / m) + 1 - b q / m. The mixture is floored at TINY, as the torch rows floor it
    (``s``: the student array, whose float type the arithmetic keeps)."""
    zero = like(s, 0.0)
    one = like(s, 1.0)
    a = q if reverse else p
    m = max(b * a + (one - b) * (p if reverse else q), like(s, TINY))
    if a <= zero:
        return zero, zero
    log_ratio = vlog(a / m)  # (one log a bucket: the K entries' logs are scalar calls, most of the row's time)
    if reverse:
        return a * log_ratio, log_ratio + one - b * a / m
    return a * log_ratio, -(one - b) * a / m


SKEW, SKEW_REVERSE, AKL, TAID = 0, 1, 2, 3  # bucket_rows' kinds


@nb.njit(inline="always", fastmath=FASTMATH)
def _bucket(s, p, q, b, kind, wf):
    """One bucket's loss term and G of ``kind``: a skewed KL (:func:`_skew_bucket`), or AKL's
    wf * KL(P || Q) + (1 - wf) * KL(Q || P) (the skewed KLs at b = 0)."""
    if kind == TAID:  # forward KL to the (already interpolated) target
        return _skew_bucket(s, p, q, like(s, 0.0), False)
    if kind == AKL and p > 0.0 and q > 0.0:  # log(p / q) serves both directions: one log
        lr = vlog(p / q)
        one = like(s, 1.0)
        return wf * p * lr - (one - wf) * q * lr, -wf * p / q + (one - wf) * (one - lr)
    if kind == AKL:
        t1, g1 = _skew_bucket(s, p, q, like(s, 0.0), False)
        t2, g2 = _skew_bucket(s, p, q, like(s, 0.0), True)
        return wf * t1 + (like(s, 1.0) - wf) * t2, wf * g1 + (like(s, 1.0) - wf) * g2
    return _skew_bucket(s, p, q, b, kind == SKEW_REVERSE)


@nb.njit(inline="always", fastmath=FASTMATH)
def _interpolated(s, q, p, t):
    """TAID's unnormalised target mass of a bucket: q^(1-t) p^t (the logits interpolated)."""
    if t <= 0.0:  # (0^0 = 1: the student itself, where the teacher has no mass too)
        return q
    if p <= 0.0 or (q <= 0.0 and t < 1.0):
        return like(s, 0.0)
    if t >= 1.0:
        return p
    return vexp((like(s, 1.0) - t) * vlog(q) + t * vlog(p))


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)  # serial over rows a..z: the caller runs ranges on threads
def bucket_rows(s, idx, pk, p_rest, temperature, beta, kind, mu, w, scale, loss, grad, bad, a, z):
    """A divergence between bucket distributions: the K entries ``idx`` (-1: none) with the
    teacher's masses ``pk`` and one bucket for the rest of the student's classes, the
    teacher's mass there ``p_rest`` (the top-K's tail, or 0 for draws). ``kind``: SKEW,
    SKEW_REVERSE (skew ``beta``) or AKL, whose row weight wf = g_head / (g_head + g_tail)
    sums |P_b - Q_b| over the head and the tail, held constant in the gradient as AKL's
    authors detach it; the tail is the least likely buckets whose running teacher mass, from
    the least, stays under ``mu``: the rest bucket first (each of its classes is below every
    entry), then the entries from the last, which must be in decreasing teacher mass (a
    top-K's order; padding anywhere). TAID: KL(P_t || Q), P_t proportional to Q^(1-t) P^t,
    t = ``beta``, held constant in the gradient (the student's side of it detached). The
    gradient is
    T q_j (G_b(j) - sum_b Q_b G_b), b(j) the bucket of class j. Rows a..z-1 only, serially
    (a prange kernel took twice the compile: 14-17 s a float type here)."""
    c = s.shape[1]
    k = idx.shape[1]
    inv_t = like(s, 1.0 / temperature)
    b = like(s, beta)
    qk = np.empty(k, s.dtype)  # a row's student masses at the entries, and their G: computed once
    gk = np.empty(k, s.dtype)
    tk = np.empty(k, s.dtype)  # TAID's target masses
    for i in range(a, z):
        if w[i] == 0.0:
            zero_row(loss, grad, i)
            continue
        s_max, total, rest = _exps_and_rest(s, i, idx, inv_t, grad)
        r_total = like(s, 1.0) / total
        q_rest = rest * r_total
        for r in range(k):
            j = idx[i, r]
            qk[r] = vexp((s[i, j] - s_max) * inv_t) * r_total if j >= 0 else like(s, 0.0)
        wf = like(s, 1.0)
        if kind == AKL:
            running = p_rest[i]
            gap = abs(p_rest[i] - q_rest)
            g_head = gap if running >= mu else like(s, 0.0)
            g_tail = like(s, 0.0) if running >= mu else gap
            for r in range(k - 1, -1, -1):  # least first
                if idx[i, r] >= 0:
                    running += pk[i, r]
                    gap = abs(pk[i, r] - qk[r])
                    if running >= mu:
                        g_head += gap
                    else:
                        g_tail += gap
            wf = g_head / (g_head + g_tail) if g_head + g_tail > 0.0 else like(s, 0.5)  # (equal rows: any)
        target_rest = p_rest[i]
        if kind == TAID:  # the interpolated target, normalised over the buckets
            target_rest = _interpolated(s, q_rest, p_rest[i], b)
            norm = target_rest
            for r in range(k):
                tk[r] = _interpolated(s, qk[r], pk[i, r], b) if idx[i, r] >= 0 else like(s, 0.0)
                norm += tk[r]
            r_norm = like(s, 1.0) / norm if norm > 0.0 else like(s, 0.0)
            target_rest *= r_norm
            for r in range(k):
                tk[r] *= r_norm
        acc, g_rest = _bucket(s, target_rest, q_rest, b, kind, wf)
        g_bar = g_rest * q_rest
        finite = is_finite(p_rest[i])
        for r in range(k):
            if idx[i, r] < 0:
                continue
            finite &= is_finite(pk[i, r])
            term, gk[r] = _bucket(s, tk[r] if kind == TAID else pk[i, r], qk[r], b, kind, wf)
            acc += term
            g_bar += qk[r] * gk[r]
        if not finite:
            bad[i] = 1
        g = like(s, scale * w[i] * temperature)
        f = g * (g_rest - g_bar) * r_total
        for j in range(c):  # the rest's gradient everywhere, then the K classes overwritten
            grad[i, j] = f * grad[i, j]
        for r in range(k):
            j = idx[i, r]
            if j >= 0:
                grad[i, j] = g * qk[r] * (gk[r] - g_bar)
        loss[i] = w[i] * temperature * temperature * acc
