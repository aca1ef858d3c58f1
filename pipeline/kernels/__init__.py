"""Numba distance kernels: NumPy in, NumPy out, forward and gradient fused in one pass
per row, parallel over rows (``pipeline/kernels/dense.py``, ``sparse.py``); and stage 1's
fused row pass over a teacher's logits (:func:`summarize_rows`, ``teacher_rows.py``).

Each entry point returns ``(loss, grad)``: the reduced loss (a float for ``mean``/``sum``,
per-row losses for ``none``) and its gradient with respect to ``student``. Teachers may be
float16 (read through a lookup table, never upcast as a whole batch), float32 or float64.
``mask`` (B,) marks rows that count (padding tokens: False) and ``weights`` (B,) scales
rows; ``mean`` divides by the sum of mask * weights. ``coef`` multiplies the loss and its
gradient (the objective's lambda, folded in so no extra pass rescales the gradient).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from pipeline.distances import distance_spec, names
from pipeline.errors import CacheError, ConfigError
from pipeline.kernels import dense, sparse
from pipeline.kernels._base import teacher_view
from pipeline.kernels.teacher_rows import MAX_CLASSES, teacher_rows

DENSE = names(reads="full", fused=True)  # the distances with a kernel over full rows
SPARSE = tuple(n for n in names(fused=True) if n not in DENSE)
REDUCTIONS = ("mean", "sum", "none")


def _student(student: np.ndarray) -> np.ndarray:
    if student.ndim != 2:
        raise ValueError(f"student must be (batch, classes); got shape {student.shape}")
    if student.dtype not in (np.float32, np.float64):
        raise ValueError(f"student dtype {student.dtype}: expected float32 or float64")
    return np.ascontiguousarray(student)


def _row_weights(n: int, mask, weights, reduction: str, coef: float = 1.0) -> tuple[np.ndarray, float]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
    w = np.full(n, float(coef), np.float64)
    if mask is None and weights is None:  # (every row, weight coef: no reduction to run)
        return w, 1.0 / n if reduction == "mean" and n and coef else 1.0
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape ({n},), one flag per row; got {mask.shape}")
        w *= mask.astype(bool)
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"weights must be ({n},) finite and >= 0; got shape {weights.shape}")
        w *= weights
    total = w.sum() / coef if coef else 0.0  # the mean divides by the row weights, not by coef
    scale = 1.0 / total if reduction == "mean" and total > 0 else 1.0
    return w, scale


def _finish(loss, grad, bad, reduction: str, scale: float, what: str):
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise CacheError(f"{what} holds non-finite values at rows {rows[:10].tolist()}"
                         f"{' ...' if len(rows) > 10 else ''}: refusing to train on them")
    if reduction == "none":
        return loss, grad
    return float(loss.sum() * scale), grad


def _block_count() -> int:
    """How many row blocks (each with a scratch row) a softmax kernel splits its rows into:
    four per thread, so a slow block does not leave a thread idle for long."""
    return 4 * numba.get_num_threads()


def _check_topk(n: int, idx, val, lse) -> None:
    if idx.ndim != 2 or idx.shape[0] != n or val.shape != idx.shape or np.shape(lse) != (n,):
        raise ValueError(f"top-k arrays must be idx (B, K), val (B, K), lse (B,) with B={n}; got idx {idx.shape}, "
                         f"val {val.shape}, lse {np.shape(lse)}")


def _check_sampled(n: int, idx, counts, entropy) -> None:
    if idx.ndim != 2 or idx.shape[0] != n or counts.shape != idx.shape or np.shape(entropy) != (n,):
        raise ValueError(f"sampled arrays must be idx (B, S), counts (B, S), entropy (B,) with B={n}; got idx "
                         f"{idx.shape}, counts {counts.shape}, entropy {np.shape(entropy)}")


def _ids_outside(c: int) -> ConfigError:
    return ConfigError(f"idx holds class ids outside [0, {c}): the student's vocabulary differs from the teacher's")


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature}: must be > 0")
    return float(temperature)


# values a thread takes at least: handing a range to another thread cost 100-150 us here
# (a prange kernel's fork 5-10 us), so a call with less work than two of these stays on one
WORK_PER_THREAD = 1 << 16


@functools.cache
def _row_pool(threads: int) -> ThreadPoolExecutor:
    """The threads the serial row kernels run on, started once per process (not once per call)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="kernel-rows")


def on_threads(rows, n: int, width: int) -> None:
    """``rows(a, z)`` over ranges of n rows of ``width`` values on up to Numba's thread count
    (one per WORK_PER_THREAD values), the first range on this thread: for the serial ``nogil``
    kernels (stage 1's row pass, the bucket kernel), which compile in half the time of prange
    ones (no parfor lowering). The distance kernels over full rows stay prange: measured
    against this, the hand-off cost them 3x at 4096x10 and 5-30% at 4096x1000."""
    threads = max(1, min(numba.get_num_threads(), n * width // WORK_PER_THREAD, n))
    if threads == 1:
        rows(0, n)
        return
    cuts = np.linspace(0, n, threads + 1).astype(int)
    rest = [_row_pool(threads - 1).submit(rows, a, z) for a, z in zip(cuts[1:-1], cuts[2:], strict=True)]
    rows(cuts[0], cuts[1])
    for f in rest:
        f.result()


def _dense(rows, student: np.ndarray, teacher: np.ndarray, params: tuple, mask, weights, reduction: str,
           coef: float):
    """A dense kernel ``rows(s, t, table, *params, w, scale, loss, grad, bad)`` over (B, C)
    student and teacher logits."""
    s = _student(student)
    if teacher.shape != s.shape:
        raise ValueError(f"teacher shape {teacher.shape} differs from student shape {s.shape}")
    if teacher.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"teacher dtype {teacher.dtype}: expected float16, float32 or float64")
    t, table = teacher_view(teacher)
    w, scale = _row_weights(len(s), mask, weights, reduction, coef)
    loss, grad, bad = np.empty(len(s), s.dtype), np.empty_like(s), np.zeros(len(s), np.uint8)
    rows(s, t, table, *params, w, scale, loss, grad, bad)
    return _finish(loss, grad, bad, reduction, scale, "teacher")


# Every kernel below takes (student, *the teacher arrays its representation holds) and the
# same keywords, whether it reads them or not: the objective calls each the same way.


def kl(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean", coef=1.0):
    return _dense(dense.kl_rows, student, teacher, (_check_temperature(temperature),), mask, weights, reduction,
                  coef)


def reverse_kl(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean",
               coef=1.0):
    return _dense(dense.reverse_kl_rows, student, teacher, (_check_temperature(temperature),), mask, weights,
                  reduction, coef)


def js(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean", coef=1.0):
    """TRL's generalized Jensen-Shannon: beta=0 is forward KL and beta=1 reverse KL, exactly."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if beta in (0.0, 1.0):
        return (kl if beta == 0.0 else reverse_kl)(student, teacher, temperature=temperature, mask=mask,
                                                    weights=weights, reduction=reduction, coef=coef)
    return _dense(dense.js_rows, student, teacher, (_check_temperature(temperature), float(beta), _block_count()), mask, weights,
                  reduction, coef)


def mse(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean", coef=1.0):
    return _dense(dense.mse_rows, student, teacher, (), mask, weights, reduction, coef)


def cosine(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean", coef=1.0):
    return _dense(dense.cosine_rows, student, teacher, (), mask, weights, reduction, coef)


def euclidean(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean",
              coef=1.0):
    return _dense(dense.euclidean_rows, student, teacher, (), mask, weights, reduction, coef)


def tv(student, teacher, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean", coef=1.0):
    return _dense(dense.tv_rows, student, teacher, (_check_temperature(temperature), _block_count()), mask, weights, reduction,
                  coef)


def distance(name: str, student: np.ndarray, teacher: np.ndarray, *, temperature: float = 1.0,
             beta: float = 0.5, mask=None, weights=None, reduction: str = "mean", coef: float = 1.0):
    """The kernel of the dense distance ``name`` (one of :data:`DENSE`) between (B, C)
    student and teacher logits."""
    if name not in DENSE:
        raise ValueError(f"distance {name!r} is unknown or not dense; the dense kernels are {list(DENSE)}")
    return globals()[distance_spec(name).kernel](student, teacher, temperature=temperature, beta=beta, mask=mask,
                                                 weights=weights, reduction=reduction, coef=coef)


def topk_kl(student: np.ndarray, idx: np.ndarray, val: np.ndarray, lse: np.ndarray, *, temperature: float = 1.0,
            beta: float = 0.5, mask=None, weights=None, reduction: str = "mean", coef: float = 1.0):
    """KL over the teacher's top-K classes plus one tail bucket; ``lse`` (B,) is the exact
    logsumexp of the teacher's whole row at ``temperature``. An id of -1 is padding (an
    adaptive row's unused entries, a class the student lacks): skipped, its mass in the tail."""
    s = _student(student)
    n, c = s.shape
    _check_topk(n, idx, val, lse)
    if idx.shape[1] > c:
        raise ConfigError(f"K={idx.shape[1]} is larger than the student's {c} classes")
    if idx.size and (idx.min() < -1 or idx.max() >= c):  # (-1: padding, skipped)
        raise _ids_outside(c)
    w, scale = _row_weights(n, mask, weights, reduction, coef)
    loss, grad, bad = np.empty(n, s.dtype), np.empty_like(s), np.zeros(n, np.uint8)
    sparse.topk_kl_rows(s, np.ascontiguousarray(idx, np.int32), np.ascontiguousarray(val, s.dtype),
                        np.ascontiguousarray(lse, s.dtype), _check_temperature(temperature), w, scale, loss, grad, bad)
    return _finish(loss, grad, bad, reduction, scale, "teacher top-k")


def sampled_kl(student: np.ndarray, idx: np.ndarray, counts: np.ndarray, entropy: np.ndarray, *,
               temperature: float = 1.0, beta: float = 0.5, mask=None, weights=None, reduction: str = "mean",
               coef: float = 1.0):
    """Unbiased RS-KD estimate of T^2 KL(p_T || q_T) from sampled ids and their counts."""
    s = _student(student)
    n, c = s.shape
    _check_sampled(n, idx, counts, entropy)
    w, scale = _row_weights(n, mask, weights, reduction, coef)
    loss, grad, bad = np.empty(n, s.dtype), np.empty_like(s), np.zeros(n, np.uint8)
    # the cache's uint16 counts as they are; any other integers as int64 (int32 counts made
    # the row loop 2.5x slower here: 8-9 ms against 3-3.7 ms at 4096x1000, an AVX2 EPYC)
    counts = np.ascontiguousarray(counts, np.uint16 if counts.dtype == np.uint16 else np.int64)
    sparse.sampled_kl_rows(s, np.ascontiguousarray(idx, np.int32), counts,
                           np.ascontiguousarray(entropy, s.dtype), _check_temperature(temperature), w, scale, loss,
                           grad, bad)
    if (bad == 2).any():  # (checked in the row loop: a separate scan of the drawn ids cost 5% of the call)
        raise _ids_outside(c)
    return _finish(loss, grad, bad, reduction, scale, "teacher samples")



def _buckets(student, idx: np.ndarray, pk: np.ndarray, p_rest: np.ndarray, kind: int, temperature: float,
             beta: float, mask, weights, reduction: str, coef: float, what: str):
    """A divergence between bucket distributions (:func:`sparse.bucket_rows`): the entries
    ``idx`` (-1: none) with the teacher's masses ``pk``, and the rest, ``p_rest``."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta}: must be in [0, 1] (the skew, or TAID's teacher weight)")
    s = _student(student)
    w, scale = _row_weights(len(s), mask, weights, reduction, coef)
    loss, grad, bad = np.empty(len(s), s.dtype), np.empty_like(s), np.zeros(len(s), np.uint8)
    args = (s, np.ascontiguousarray(idx, np.int32), np.ascontiguousarray(pk, s.dtype),
            np.ascontiguousarray(p_rest, s.dtype), _check_temperature(temperature), float(beta), kind, AKL_MU, w,
            scale, loss, grad, bad)
    on_threads(lambda a, z: sparse.bucket_rows(*args, a, z), len(s), s.shape[1])
    return _finish(loss, grad, bad, reduction, scale, what)


def _topk_masses(student, idx, val, lse, temperature):
    """The top-K arrays as bucket masses: p_k = exp(v / T - lse) (0 on padding) and the
    tail's 1 - sum p_k, checked as :func:`topk_kl` checks them."""
    s = _student(student)
    n, c = s.shape
    _check_topk(n, idx, val, lse)
    if idx.size and (idx.min() < -1 or idx.max() >= c):
        raise _ids_outside(c)
    held = idx >= 0
    dtype = s.dtype  # (float32 exps: a quarter of the time of float64 ones here)
    with np.errstate(all="ignore"):  # a non-finite value stays so: the kernel names its row
        pk = np.where(held, np.exp(np.asarray(val, dtype) * dtype.type(1 / _check_temperature(temperature))
                                   - np.asarray(lse, dtype)[:, None]), dtype.type(0))
        p_rest = np.maximum(1.0 - pk.sum(1, dtype=np.float64), 0.0) + 0.0 * lse  # (NaN lse: NaN)
    return s, idx, pk, p_rest


def _sample_masses(student, idx, counts, entropy):
    """The draws as bucket masses: their frequencies, the rest 0 (a row without draws: NaN,
    refused by the kernel as sampled_kl refuses it)."""
    s = _student(student)
    n, c = s.shape
    _check_sampled(n, idx, counts, entropy)
    held = counts > 0
    if held.any() and (idx[held].min() < 0 or idx[held].max() >= c):
        raise _ids_outside(c)
    draws = counts.sum(1, dtype=np.float64)
    with np.errstate(all="ignore"):
        return s, np.where(held, idx, -1), counts / draws[:, None], np.where(draws > 0, 0.0, np.nan)


def skew_kl_topk(student, idx, val, lse, *, temperature=1.0, beta=0.1, mask=None, weights=None, reduction="mean",
                 coef=1.0):
    """Skew KL over the top-K classes plus the tail bucket: KL(P || b P + (1-b) Q)."""
    return _buckets(*_topk_masses(student, idx, val, lse, temperature), sparse.SKEW, temperature, beta, mask, weights,
                   reduction, coef, "teacher top-k")


def skew_reverse_kl_topk(student, idx, val, lse, *, temperature=1.0, beta=0.1, mask=None, weights=None,
                         reduction="mean", coef=1.0):
    """Skew reverse KL over the top-K classes plus the tail bucket: KL(Q || b Q + (1-b) P)."""
    return _buckets(*_topk_masses(student, idx, val, lse, temperature), sparse.SKEW_REVERSE, temperature, beta, mask, weights,
                   reduction, coef, "teacher top-k")


def skew_kl_sampled(student, idx, counts, entropy, *, temperature=1.0, beta=0.1, mask=None, weights=None,
                    reduction="mean", coef=1.0):
    """Skew KL from the draws' frequencies W: KL(W || b W + (1-b) Q)."""
    return _buckets(*_sample_masses(student, idx, counts, entropy), sparse.SKEW, temperature, beta, mask, weights,
                   reduction, coef, "teacher samples")


def skew_reverse_kl_sampled(student, idx, counts, entropy, *, temperature=1.0, beta=0.1, mask=None, weights=None,
                            reduction="mean", coef=1.0):
    """Skew reverse KL from the draws' frequencies W: KL(Q || b Q + (1-b) W); the student's
    mass outside the drawn ids costs log(1/b) a unit (so b must be > 0 to be finite)."""
    return _buckets(*_sample_masses(student, idx, counts, entropy), sparse.SKEW_REVERSE, temperature, beta, mask, weights,
                   reduction, coef, "teacher samples")


AKL_MU = 0.5  # AKL's split: the tail is the least likely classes holding less than this mass (the paper's 0.5)


def akl_topk(student, idx, val, lse, *, temperature=1.0, beta=0.5, mask=None, weights=None, reduction="mean",
             coef=1.0):
    """Adaptive KL (Wu et al., 2024) over the top-K classes plus the tail bucket:
    wf KL(P || Q) + (1 - wf) KL(Q || P), wf = g_head / (g_head + g_tail), the gaps
    sum |P_b - Q_b| over the head and the tail; the tail is the buckets of least teacher
    mass whose running total, from the least, stays under AKL_MU (the tail bucket first: its
    classes are each below every cached one, so it counts whole)."""
    s, idx, pk, p_rest = _topk_masses(student, idx, val, lse, temperature)
    held = idx >= 0
    if (np.diff(np.where(held, pk, -1.0), axis=1)[held[:, 1:]] > 0).any():  # not largest first: sort
        order = np.argsort(np.where(held, -pk, 1.0), axis=1, kind="stable")
        idx, pk = np.take_along_axis(idx, order, 1), np.take_along_axis(pk, order, 1)
    return _buckets(s, idx, pk, p_rest, sparse.AKL, temperature, 0.0, mask, weights, reduction, coef,
                    "teacher top-k")


def taid_topk(student, idx, val, lse, *, temperature=1.0, beta=1.0, mask=None, weights=None, reduction="mean",
              coef=1.0):
    """TAID over the top-K classes plus the tail bucket: KL(P_t || Q), P_t proportional to
    Q^(1-t) P^t per bucket, t = ``beta`` (the tail bucket's Q_tail^(1-t) P_tail^t bounds the
    sum over its classes from above: the teacher's tail is not cached class by class)."""
    return _buckets(*_topk_masses(student, idx, val, lse, temperature), sparse.TAID, temperature, beta, mask,
                    weights, reduction, coef, "teacher top-k")


def taid_sampled(student, idx, counts, entropy, *, temperature=1.0, beta=1.0, mask=None, weights=None,
                 reduction="mean", coef=1.0):
    """TAID with the draws' frequencies W standing for the teacher: P_t proportional to
    Q^(1-t) W^t over the drawn ids (none elsewhere)."""
    return _buckets(*_sample_masses(student, idx, counts, entropy), sparse.TAID, temperature, beta, mask, weights,
                    reduction, coef, "teacher samples")


__all__ = ["DENSE", "SPARSE", "cosine", "distance", "euclidean", "js", "kl", "mse", "reverse_kl", "sampled_kl",
           "akl_topk", "skew_kl_sampled", "skew_kl_topk", "skew_reverse_kl_sampled", "skew_reverse_kl_topk", "taid_sampled", "taid_topk", "topk_kl", "tv"]


# stage 1's fused row pass (pipeline/kernels/teacher_rows.py): its tables and its entry point

def bf16_exp_tables(inv_t: np.ndarray) -> np.ndarray:
    """(U, 65,536) float64: exp(x * inv_t) for every bfloat16 bit pattern x, per temperature
    (512 KiB each, read from L2): a bfloat16 row's exp sums are then a gather per logit."""
    return _exp_tables(tuple(float(t) for t in inv_t))


@functools.lru_cache(maxsize=8)
def _exp_tables(inv_t: tuple[float, ...]) -> np.ndarray:
    with np.errstate(all="ignore"):  # NaN patterns give NaN, +inf inf, -inf 0: the row checks see them
        x = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
        t = np.exp(x[None, :] * np.array(inv_t, np.float64)[:, None])
    t.setflags(write=False)
    return t


def summarize_rows(x: np.ndarray, k: int, temperatures: list[float], sample_temperature: float | None,
                   uniforms: np.ndarray | None) -> dict[str, np.ndarray]:
    """The fused row pass over (n, C) logits, float32 or bfloat16 bit patterns as uint16
    (read as they are, no float32 copy): ``top_idx``, ``top_val`` (k > 0), ``lse``
    (n, len(temperatures)), and with a sample temperature and (n, S) sorted uniforms
    ``s_idx``, ``s_cnt``, ``ent``; always ``top1``."""
    bf16 = x.dtype == np.uint16
    x = np.ascontiguousarray(x) if bf16 else np.ascontiguousarray(x, np.float32)
    n, c = x.shape
    if c > MAX_CLASSES:
        raise ConfigError(f"the row pass takes at most {MAX_CLASSES} classes a row, not {c}")
    temps = list(dict.fromkeys([*temperatures, *([sample_temperature] if sample_temperature else [])]))
    inv_t = np.array([1.0 / t for t in temps], np.float32)
    col = temps.index(sample_temperature) if sample_temperature else -1
    u = np.zeros((n, 0)) if uniforms is None else np.ascontiguousarray(uniforms, np.float64)
    tables = bf16_exp_tables(inv_t) if bf16 and len(temps) else np.zeros((0, 0))
    out = {"top_idx": np.empty((n, k), np.int32), "top_val": np.empty((n, k), np.float32),
           "lse": np.empty((n, len(temps)), np.float32), "s_idx": np.empty(u.shape, np.int32),
           "s_cnt": np.empty(u.shape, np.int32), "ent": np.zeros(n, np.float32), "top1": np.empty(n, np.int32)}

    def rows(a: int, b: int) -> None:  # (``out`` in the kernel's argument order)
        teacher_rows(x[a:b], k, inv_t, col, u[a:b], tables, *(o[a:b] for o in out.values()))

    on_threads(rows, n, c)
    out["lse"] = out["lse"][:, [temps.index(t) for t in temperatures]]
    return out
