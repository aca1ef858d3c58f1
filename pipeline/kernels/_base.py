"""Shared pieces of the kernels.

- ``vexp``/``vlog``: exp and log that LLVM can vectorise. Numba here has no SVML, so
  ``math.exp`` on float32 is a scalar libm call per value; these are Cody-Waite range
  reduction + a minimax polynomial (exp, max relative error ~6e-8 on [-87, 88]) and an
  exponent/mantissa split + a series in atanh form (log, ~1e-7), with integer bit casts,
  emitted as LLVM instructions at each call site (Numba intrinsics), so a loop over them
  becomes SIMD and a kernel does not type their bodies again at every use. float64 inputs
  keep ``math.exp``/``math.log`` (exact reference path, used by gradcheck).
- ``like(a, x)``: the constant x in a's float type, so float32 kernels stay float32.
- ``tval``: reads a teacher value that may be float16, passed as its uint16 bits (Numba
  has no float16 on CPU), through a 65,536-entry table: no upcast copy of the batch.
- ``is_finite``: an integer test of the exponent bits (``math.isfinite`` is folded to
  True under fastmath, seen here).
- ``row_max``: row maxima. ``max`` skips a NaN, so the softmax kernels flag a bad teacher
  row from its results instead: any NaN or infinite teacher value makes the row's loss
  non-finite (inf - inf, 0 * -inf), and that is checked once per row.

Kernels use ``FASTMATH`` (reassociation, so reductions vectorise) but never ``nnan`` or
``ninf``: the non-finite guards must survive optimisation.

Numba's on-disk cache (cache=True) keys on the file that defines each kernel: after editing
this file, delete pipeline/kernels/__pycache__/*.nb[ic] or the kernels keep the old code.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# float16 bit pattern -> float32 value, for all 65,536 patterns (256 KiB, stays in L2)
HALF_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
NO_TABLE = np.zeros(1, np.float32)


@intrinsic
def _i32_as_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _f32_as_i32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _f64_as_i64(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


def is_finite(x):  # pragma: no cover
    return math.isfinite(x)


@overload(is_finite, inline="always")
def _is_finite(x):
    """An exponent-bits test: ``math.isfinite`` is folded to True under fastmath."""
    if x == types.float32:
        return lambda x: (_f32_as_i32(x) & np.int32(0x7F800000)) != np.int32(0x7F800000)
    return lambda x: (_f64_as_i64(x) & np.int64(0x7FF0000000000000)) != np.int64(0x7FF0000000000000)


def _f32(value: float) -> ir.Constant:
    """A float32 constant: ``value`` rounded to float32 as NumPy rounds it."""
    return ir.Constant(ir.FloatType(), float(np.float32(value)))


def _i32(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(32), value)


def _select_max(builder, x, lo):  # Numba's max(x, lo): lo where lo >= x, else x (a NaN x stays)
    return builder.select(builder.fcmp_ordered(">=", lo, x), lo, x)


def _poly(builder, r, coefficients):  # Horner: ((c0 r + c1) r + c2) ...
    p = _f32(coefficients[0])
    for c in coefficients[1:]:
        p = builder.fadd(builder.fmul(p, r), _f32(c))
    return p


# exp32 and log32 are intrinsics: they emit their LLVM instructions at each call site, so a
# kernel compiles without typing their bodies again at every use (inlined Numba IR took most
# of a float32 softmax kernel's compile); LLVM sees the same straight-line code either way.
@intrinsic
def exp32(typingctx, x):
    """exp for float32: Cody-Waite range reduction (x = n ln 2 + r, ln 2 in two parts) and a
    minimax polynomial for exp(r), scaled by 2^n through the exponent bits; max relative
    error ~6e-8 on [-87, 88], inputs clamped there."""
    def codegen(context, builder, sig, args):
        (x,) = args
        f32 = ir.FloatType()
        x = _select_max(builder, x, _f32(-87.3))
        hi = _f32(88.7)
        x = builder.select(builder.fcmp_ordered("<=", hi, x), hi, x)  # Numba's min(x, hi)
        floor = builder.module.declare_intrinsic("llvm.floor", [f32])
        n = builder.call(floor, [builder.fadd(builder.fmul(x, _f32(1.4426950408889634)), _f32(0.5))])
        r = builder.fsub(builder.fsub(x, builder.fmul(n, _f32(0.693359375))), builder.fmul(n, _f32(-2.12194440e-4)))
        p = _poly(builder, r, (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1))
        p = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), _f32(1.0))
        scale = builder.shl(builder.add(builder.fptosi(n, ir.IntType(32)), _i32(127)), _i32(23))
        return builder.fmul(p, builder.bitcast(scale, f32))
    return types.float32(types.float32), codegen


@intrinsic
def log32(typingctx, x):
    """log for finite float32 x > 0 (0 -> about -88.7, the kernels never rely on it): the
    exponent/mantissa split, the mantissa folded into [0.71, 1.41] branch-free, and
    log m = 2 atanh z, z = (m - 1) / (m + 1), |z| < 0.172, as a series (~1e-7)."""
    def codegen(context, builder, sig, args):
        (x,) = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        bits = builder.bitcast(_select_max(builder, x, _f32(1.1754944e-38)), i32)
        e = builder.sub(builder.and_(builder.ashr(bits, _i32(23)), _i32(255)), _i32(127))
        m = builder.bitcast(builder.or_(builder.and_(bits, _i32(0x007FFFFF)), _i32(0x3F800000)), f32)
        big = builder.zext(builder.fcmp_ordered(">", m, _f32(1.41421356)), i32)
        m = builder.fmul(m, builder.fsub(_f32(1.0), builder.fmul(_f32(0.5), builder.sitofp(big, f32))))
        e = builder.add(e, big)
        z = builder.fdiv(builder.fsub(m, _f32(1.0)), builder.fadd(m, _f32(1.0)))
        s = _poly(builder, builder.fmul(z, z), (2.0 / 9.0, 2.0 / 7.0, 2.0 / 5.0, 2.0 / 3.0, 2.0))
        return builder.fadd(builder.fmul(z, s), builder.fmul(builder.sitofp(e, f32), _f32(0.6931471805599453)))
    return types.float32(types.float32), codegen


def vexp(x):  # pragma: no cover - replaced by the overload in compiled code
    return math.exp(x)


def vlog(x):  # pragma: no cover
    return math.log(x)


def like(a, x):  # pragma: no cover
    return x


@overload(vexp, inline="always")
def _vexp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: math.exp(x)


@overload(vlog, inline="always")
def _vlog(x):
    if x == types.float32:
        return lambda x: log32(x)
    return lambda x: math.log(x)


@overload(like, inline="always")
def _like(a, x):
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a, x: np.float32(x)
    return lambda a, x: np.float64(x)


def tval(t, i, j, table):  # pragma: no cover
    return t[i, j]


@overload(tval, inline="always")
def _tval(t, i, j, table):
    if isinstance(t, types.Array) and t.dtype == types.uint16:
        return lambda t, i, j, table: table[t[i, j]]
    return lambda t, i, j, table: t[i, j]


@nb.njit  # no fastmath, and inlined by LLVM (not Numba): these two operations keep their order
def shifted(x, x_max, inv_t):
    """(x - x_max) / T as written. With reassociation allowed around it, LLVM distributes a
    row's sum of p * (log p - log q) over t - t_max and hoists p * t_max out of the loop,
    and at logits of +-1e4 the two halves cancel to 1e-4 in float32."""
    return (x - x_max) * inv_t


@nb.njit(inline="always")
def zero_row(loss, grad, i):
    """A skipped row (masked, or refused): zero loss and zero gradient."""
    loss[i] = 0.0
    for j in range(grad.shape[1]):
        grad[i, j] = 0.0


@nb.njit(inline="always", fastmath=FASTMATH)
def row_max(s, t, i, table):
    s_max = like(s, -np.inf)
    t_max = like(s, -np.inf)
    for j in range(s.shape[1]):
        s_max = max(s_max, s[i, j])
        t_max = max(t_max, tval(t, i, j, table))
    return s_max, t_max


@nb.njit(inline="always", fastmath=FASTMATH)
def max_and_total(s, i, inv_t):
    """Row i's maximum and sum of exp((s - max) * inv_t): its softmax's normaliser."""
    s_max = like(s, -np.inf)
    for j in range(s.shape[1]):
        s_max = max(s_max, s[i, j])
    total = like(s, 0.0)
    for j in range(s.shape[1]):
        total += vexp((s[i, j] - s_max) * inv_t)
    return s_max, total


@nb.njit(inline="always", fastmath=FASTMATH)
def max_and_exps(s, i, inv_t, out):
    """Row i's maximum and softmax normaliser, as :func:`max_and_total`, with each
    exp((s - max) * inv_t) kept in ``out[i]``: one exp an element where the softmax is
    needed again (the sparse kernels' gradients)."""
    s_max = like(s, -np.inf)
    for j in range(s.shape[1]):
        s_max = max(s_max, s[i, j])
    total = like(s, 0.0)
    for j in range(s.shape[1]):
        e = vexp((s[i, j] - s_max) * inv_t)
        out[i, j] = e
        total += e
    return s_max, total


def teacher_view(teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher array as the kernels read it, and the table that decodes it."""
    if teacher.dtype == np.float16:
        return np.ascontiguousarray(teacher).view(np.uint16), HALF_TABLE
    return np.ascontiguousarray(teacher), NO_TABLE


FINITE_BLOCK = 4096  # values between the finiteness check's exits


@nb.njit(parallel=False, cache=True, nogil=True)  # the stream checks on its prefetch thread
def _bits_all_finite(bits, exp_mask):
    """No value with all exponent bits set: by blocks, a branch-free OR of the tests (it
    vectorises; a test and an exit per value did not), checked between them."""
    n = bits.size
    for a in range(0, n, FINITE_BLOCK):
        bad = False
        for i in range(a, min(a + FINITE_BLOCK, n)):
            bad |= (bits[i] & exp_mask) == exp_mask
        if bad:
            return False
    return True


def all_finite(a: np.ndarray) -> bool:
    """True when no value of a float16/32/64 array is NaN or infinite: an exponent-bits scan,
    several times faster than ``np.isfinite`` on float16 (which NumPy emulates)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.float16:
        return bool(_bits_all_finite(flat.view(np.uint16), np.uint16(0x7C00)))
    if a.dtype == np.float32:
        return bool(_bits_all_finite(flat.view(np.uint32), np.uint32(0x7F800000)))
    return bool(np.isfinite(flat).all())
