"""Shared pieces of the kernels: reading a teacher value that may be float16 (passed as
its uint16 bits: Numba has no float16 on CPU) without an upcast copy of the batch, and the
per-row epilogue that applies row weights (0 = masked: skipped entirely).

Numba's on-disk cache (cache=True) keys on the file that defines each kernel: after editing
this file, delete pipeline/kernels/__pycache__/*.nb[ic] or the kernels keep the old code."""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

# float16 bit pattern -> float32 value, for all 65,536 patterns (256 KiB, stays in L2)
HALF_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
NO_TABLE = np.zeros(1, np.float32)


def tval(t, i, j, table):  # pragma: no cover - replaced by the overload in compiled code
    return t[i, j]


@overload(tval, inline="always")
def _tval(t, i, j, table):
    if isinstance(t, types.Array) and t.dtype == types.uint16:
        return lambda t, i, j, table: table[t[i, j]]
    return lambda t, i, j, table: t[i, j]


@nb.njit(inline="always")
def row_max(s, t, i, table):
    s_max = -np.inf
    t_max = -np.inf
    poison = 0.0  # becomes NaN if any teacher value is NaN or infinite (max() would skip a NaN)
    for j in range(s.shape[1]):
        tv = tval(t, i, j, table)
        s_max = max(s_max, s[i, j])
        t_max = max(t_max, tv)
        poison += tv * 0.0
    return s_max, t_max + poison


def teacher_view(teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher array as the kernels read it, and the table that decodes it."""
    if teacher.dtype == np.float16:
        return np.ascontiguousarray(teacher).view(np.uint16), HALF_TABLE
    return np.ascontiguousarray(teacher), NO_TABLE
