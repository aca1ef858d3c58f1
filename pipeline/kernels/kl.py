"""Forward KL at temperature T, scaled by T^2 (Hinton et al., 2015).

For teacher logits t and student logits s of one row, with p = softmax(t/T) and
q = softmax(s/T):

    loss = T^2 * sum_j p_j (log p_j - log q_j)
    d loss / d s_j = T * (q_j - p_j)

Everything is computed in the log domain from max-shifted logits, so logits of
+-1e4 neither overflow nor produce 0 * log 0.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True, nogil=True)
def _kl_rows(s, t, temperature, loss, grad):  # s, grad: (B, C) float; t: (B, C) float; loss: (B,)
    n, c = s.shape
    inv_t = 1.0 / temperature
    for i in nb.prange(n):
        t_max = -np.inf
        s_max = -np.inf
        for j in range(c):
            t_max = max(t_max, t[i, j])
            s_max = max(s_max, s[i, j])
        t_sum = 0.0
        s_sum = 0.0
        for j in range(c):
            e = math.exp((t[i, j] - t_max) * inv_t)
            grad[i, j] = e  # unnormalised p, finished below
            t_sum += e
            s_sum += math.exp((s[i, j] - s_max) * inv_t)
        t_lse = math.log(t_sum)
        s_lse = math.log(s_sum)
        acc = 0.0
        for j in range(c):
            log_p = (t[i, j] - t_max) * inv_t - t_lse
            log_q = (s[i, j] - s_max) * inv_t - s_lse
            p = grad[i, j] / t_sum
            acc += p * (log_p - log_q)
            grad[i, j] = temperature * (math.exp(log_q) - p)
        loss[i] = temperature * temperature * acc


def kl_forward(student: np.ndarray, teacher: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` and its gradient
    with respect to ``student``.

    Args:
        student: (B, C) float32 or float64, C-contiguous.
        teacher: (B, C) float32/float64, or float16 (upcast per call).
        temperature: T > 0.

    Returns:
        loss (B,) and grad (B, C), both in ``student``'s dtype.
    """
    check_pair(student, teacher, temperature)
    if teacher.dtype == np.float16 or teacher.dtype != student.dtype:
        teacher = teacher.astype(student.dtype)
    loss = np.empty(student.shape[0], dtype=student.dtype)
    grad = np.empty_like(student)
    _kl_rows(np.ascontiguousarray(student), np.ascontiguousarray(teacher), float(temperature), loss, grad)
    return loss, grad


def check_pair(student: np.ndarray, teacher: np.ndarray, temperature: float) -> None:
    if student.ndim != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be (batch, classes); got student {student.shape}, "
                         f"teacher {teacher.shape}")
    if student.dtype not in (np.float32, np.float64):
        raise ValueError(f"student dtype {student.dtype}: expected float32 or float64")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
