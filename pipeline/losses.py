"""The distillation objective, ``alpha * CE(student, labels) + lam * D(teacher, student)``.

On CPU tensors, D runs in the Numba kernels (:mod:`pipeline.kernels`) through a
``torch.autograd.Function`` over zero-copy NumPy views: the kernel returns the loss and
its gradient in one pass, and backward only scales the saved gradient. On CUDA tensors
the same functions run the plain torch implementations below (also the reference the
benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import kernels

_EPS = 1e-8


class _Kernel(torch.autograd.Function):
    """Bridge: ``call(student_numpy) -> (loss, grad)``, grad = d loss / d student."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, call: Callable) -> torch.Tensor:
        loss, grad = call(student.detach().contiguous().numpy())
        ctx.save_for_backward(torch.from_numpy(grad))
        ctx.per_row = np.ndim(loss) == 1
        return torch.as_tensor(loss, dtype=student.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors  # never scaled in place: backward may run again (retain_graph)
        if ctx.per_row:
            return g.unsqueeze(1) * grad, None
        # g == 1 (the usual case: the loss weight is folded into the kernel via `coef`): hand
        # the kernel's gradient over as is; autograd copies it if anything else still holds it
        return (grad if bool(g == 1) else g * grad), None


def _np(x) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --- plain torch: the CUDA path and the benchmark's reference ------------------------------


def torch_distance(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0,
                   beta: float = 0.5) -> torch.Tensor:
    """Per-row distance (B,) in plain torch, same definitions as the kernels."""
    t = t.to(s.dtype)
    if name in ("mse", "cosine", "euclidean"):
        if name == "mse":
            return ((s - t) ** 2).mean(-1)
        if name == "cosine":
            return 1 - (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(_EPS) * t.norm(dim=-1).clamp_min(_EPS))
        return (s - t).norm(dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    if name == "kl" or (name == "js" and beta == 0):
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif name == "reverse_kl" or (name == "js" and beta == 1):
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif name == "js":
        log_m = torch.logaddexp(log_p + np.log(beta), log_q + np.log(1 - beta))
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"distance {name!r} is unknown; expected one of {list(kernels.DENSE)}")
    return temperature**2 * d


def torch_topk_kl(s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, lse: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(s / temperature, dim=-1)
    held = idx >= 0  # -1: padding (an adaptive row's unused entries), skipped
    at = idx.long().clamp_min(0)
    log_p = torch.where(held, val.to(s.dtype) / temperature - lse.to(s.dtype).unsqueeze(-1), 0)  # (B, K)
    p = torch.where(held, log_p.exp(), 0)
    log_qk = log_q.gather(1, at)
    kept = torch.zeros_like(log_q, dtype=torch.int32).scatter_add_(1, at, held.int()) > 0
    q_tail = log_q.exp().masked_fill(kept, 0).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    tail = torch.where((p_tail > 0) & (q_tail > 0), p_tail * (p_tail.clamp_min(1e-38).log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    return temperature**2 * ((p * (log_p - log_qk)).sum(-1) + tail)


def torch_sampled_kl(s: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, ent: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(s / temperature, dim=-1)
    w = cnt.to(s.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1)  # rows without draws (padding): 0, not 0/0
    return temperature**2 * (-(w * log_q.gather(1, idx.long().clamp_min(0))).sum(-1) - ent.to(s.dtype))


def _reduce(rows: torch.Tensor, mask, weights, reduction: str) -> torch.Tensor:
    w = torch.ones_like(rows)
    if mask is not None:
        w = w * torch.as_tensor(mask, device=rows.device).to(rows.dtype)
    if weights is not None:
        w = w * torch.as_tensor(weights, device=rows.device).to(rows.dtype)
    rows = torch.where(w > 0, rows * w, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() / w.sum().clamp_min(torch.finfo(rows.dtype).tiny) if reduction == "mean" else rows.sum()


# --- the public losses ----------------------------------------------------------------------


def _dispatch(student: torch.Tensor, arrays: tuple, torch_rows: Callable, kernel: Callable, *, mask, weights,
              reduction: str, coef: float) -> torch.Tensor:
    """CUDA tensors: the plain torch rows, reduced. CPU tensors: the Numba kernel (loss and
    gradient in one pass) through the autograd bridge, on zero-copy NumPy views."""
    if student.device.type != "cpu":
        rows = torch_rows(student, *(torch.as_tensor(a, device=student.device) for a in arrays))
        return coef * _reduce(rows, mask, weights, reduction)
    views = [_np(a) for a in arrays]
    m, w = _np(mask), _np(weights)
    return _Kernel.apply(student, lambda s: kernel(s, *views, mask=m, weights=w, reduction=reduction, coef=coef))


def distance_loss(name: str, student: torch.Tensor, teacher, *, temperature: float = 1.0, beta: float = 0.5,
                  mask=None, weights=None, reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times a dense distance between (B, C) student logits and teacher logits."""
    return _dispatch(student, (teacher,), lambda s, t: torch_distance(name, s, t, temperature, beta),
                     lambda s, t, **kw: kernels.distance(name, s, t, temperature=temperature, beta=beta, **kw),
                     mask=mask, weights=weights, reduction=reduction, coef=coef)


def topk_kl_loss(student: torch.Tensor, idx, val, lse, *, temperature: float = 1.0, mask=None, weights=None,
                 reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times the top-K + tail KL (:func:`pipeline.kernels.topk_kl`)."""
    return _dispatch(student, (idx, val, lse), lambda s, *a: torch_topk_kl(s, *a, temperature),
                     lambda s, *a, **kw: kernels.topk_kl(s, *a, temperature=temperature, **kw),
                     mask=mask, weights=weights, reduction=reduction, coef=coef)


def sampled_kl_loss(student: torch.Tensor, idx, counts, entropy, *, temperature: float = 1.0, mask=None,
                    weights=None, reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times the unbiased sampled KL estimate (:func:`pipeline.kernels.sampled_kl`)."""
    return _dispatch(student, (idx, counts, entropy), lambda s, *a: torch_sampled_kl(s, *a, temperature),
                     lambda s, *a, **kw: kernels.sampled_kl(s, *a, temperature=temperature, **kw),
                     mask=mask, weights=weights, reduction=reduction, coef=coef)


def sorted_teacher_probs(teacher: dict, name: str, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's probabilities at ``temperature`` in decreasing order, (rows, K), and
    the mass outside them: from the top-K (its values are sorted) and the logsumexp, or
    from the draws' frequencies (which sum to 1: no tail; rows without draws are zeros)."""
    if name == "uld_topk":
        p = np.exp(teacher["topk_val"].astype(np.float64) / temperature - teacher["lse"].astype(np.float64)[:, None])
        p = -np.sort(-p, axis=1)
        return p.astype(np.float32), np.clip(1 - p.sum(1), 0, 1).astype(np.float32)
    cnt = teacher["sampled_cnt"].astype(np.float64)
    p = -np.sort(-cnt / np.maximum(cnt.sum(1, keepdims=True), 1), axis=1)
    return p.astype(np.float32), np.zeros(len(p), np.float32)


def torch_uld(s: torch.Tensor, p: torch.Tensor, tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row: sum_k |p_(k) - q_(k)| over the K largest probabilities of teacher and
    student at ``temperature``, plus |teacher tail - student tail| for the rest (a lower
    bound of the L1 between the sorted remainders, which the cache does not hold)."""
    q = F.softmax(s.to(torch.promote_types(s.dtype, torch.float32)) / temperature, dim=-1)
    k = min(p.shape[1], q.shape[1])
    top = torch.topk(q, k, dim=-1).values
    p = p.to(q.dtype)
    rest = p[:, k:].sum(-1) + tail.to(q.dtype)  # a teacher K wider than the student's vocabulary
    return (p[:, :k] - top).abs().sum(-1) + (rest - (1 - top.sum(-1)).clamp_min(0)).abs()


def uld_loss(student: torch.Tensor, p, tail, *, temperature: float = 1.0, mask=None, weights=None,
             reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times Universal Logit Distillation's sorted-probability L1 (Boizard et al.
    2024) between (B, V) student logits and the teacher's sorted probabilities ``p`` (B, K)
    and tail mass (B,). Plain torch on every device (a top-K selection per row; the other
    losses' fused kernels do not cover it). Masked rows are not computed."""
    keep = np.ones(len(student), bool) if mask is None else np.asarray(_np(mask), bool)
    w = np.ones(len(student), np.float32) if weights is None else np.asarray(_np(weights), np.float32)
    keep = keep & (w > 0)
    at = torch.from_numpy(np.flatnonzero(keep)).to(student.device)
    rows = torch_uld(student[at], *(torch.as_tensor(np.asarray(_np(x))[keep], device=student.device)
                                    for x in (p, tail)), temperature)
    rows = rows * torch.as_tensor(w[keep], device=student.device)
    if reduction == "none":
        return coef * torch.zeros(len(student), dtype=rows.dtype, device=student.device).index_put((at,), rows)
    total = rows.sum()
    return coef * (total / max(float(w[keep].sum()), 1e-30) if reduction == "mean" else total)


# --- the objective: which cache arrays a distance reads, and the loss over them -------------


SPARSE_MODE = {"topk_kl": "topk", "sampled_kl": "sampled", "uld_topk": "topk", "uld_sampled": "sampled"}
# (the dense distances read `full`)
ARRAYS = {"full": ("logits",), "topk": ("topk_idx", "topk_val", "lse"),
          "sampled": ("sampled_idx", "sampled_cnt", "sampled_ent")}


def teacher_arrays(m, loss) -> tuple[tuple[str, ...], int]:
    """The cache arrays ``loss`` (a ``loss.*`` section) trains from, and which column of
    ``lse`` holds its temperature; nothing when ``loss.lam`` is 0 (labels alone). A cache
    (its manifest ``m``) that lacks them is refused, saying what to capture."""
    if loss.lam == 0:
        return (), 0
    name, T = loss.distance.value, loss.temperature
    need = SPARSE_MODE.get(name, "full")
    if need not in m.modes:
        raise ValueError(f"loss.distance={name} trains from the '{need}' representation; the cache holds {m.modes}: "
                         f"capture it with cache.modes=[{need}] (or pick a distance for {m.modes})")
    if need == "topk":
        if T not in m.temperatures:
            raise ValueError(f"loss.temperature={T}: the cache holds the top-k tail mass only at temperatures "
                             f"{m.temperatures}; use one of them, or re-capture with cache.temperatures")
        if not 0 <= loss.k <= m.k:
            raise ValueError(f"loss.k={loss.k}: the cache holds the top {m.k} logits per row (0 uses all)")
        return ARRAYS[need], m.temperatures.index(T)
    if need == "sampled" and T != m.sample_temperature:
        raise ValueError(f"loss.temperature={T} but the cache's samples were drawn at T={m.sample_temperature}: "
                         f"set loss.temperature={m.sample_temperature}")
    return ARRAYS[need], 0


def select_teacher(arrays: dict, lse_column: int, k: int = 0) -> dict:
    """A batch's cache arrays as the loss reads them: the ``lse`` column of the loss's
    temperature, and only the first ``k`` of the top-K (sorted, largest first: what a K=k
    cache holds; 0: all)."""
    t = dict(arrays)
    if "lse" in t:
        t["lse"] = np.ascontiguousarray(t["lse"][:, lse_column])
    if k and "topk_idx" in t and k < t["topk_idx"].shape[1]:
        t["topk_idx"], t["topk_val"] = (np.ascontiguousarray(t[n][:, :k]) for n in ("topk_idx", "topk_val"))
    return t


def teacher_term(student: torch.Tensor, teacher: dict, cfg, mask=None, *, reduction: str = "mean",
                 coef: float | None = None) -> torch.Tensor:
    """``lam * mean D(teacher, student)`` over the rows ``mask`` keeps (all by default), for
    the configured distance, from a batch of cache arrays as :func:`select_teacher` gives
    them (lam is folded into the kernel: its gradient needs no rescaling pass). ``coef``
    replaces lam, ``reduction`` the mean (the fused head sums its chunks, each scaled)."""
    name, T = cfg.distance.value, cfg.temperature
    kw = {"mask": mask, "reduction": reduction, "coef": cfg.lam if coef is None else coef}
    if name == "topk_kl":
        return topk_kl_loss(student, teacher["topk_idx"], teacher["topk_val"], teacher["lse"], temperature=T, **kw)
    if name == "sampled_kl":
        return sampled_kl_loss(student, teacher["sampled_idx"], teacher["sampled_cnt"], teacher["sampled_ent"],
                               temperature=T, **kw)
    if name in ("uld_topk", "uld_sampled"):
        p, tail = sorted_teacher_probs(teacher, name, T)
        return uld_loss(student, p, tail, temperature=T, **kw)
    logits = teacher["logits"]
    if tuple(logits.shape) != tuple(student.shape):
        raise ValueError(f"teacher logits {tuple(logits.shape)} and student logits {tuple(student.shape)} differ: "
                         "the student's class count must equal the cache's")
    return distance_loss(name, student, logits, temperature=T, beta=cfg.beta, **kw)


def distill_loss(student: torch.Tensor, labels: torch.Tensor, teacher, cfg) -> torch.Tensor:
    """``alpha * CE`` over the labeled rows (labels >= 0) plus ``lam * mean(D)`` over all rows.

    Args:
        student: (B, C) student logits.
        labels: (B,) int64; -1 marks an unlabeled row, which contributes only to D.
        teacher: a dict of cache arrays for the batch (``logits``, or the top-k / sampled
            arrays), a (B, C) array of teacher logits, or None for label-only training.
    """
    total = student.new_zeros(())
    labeled = labels >= 0
    if cfg.alpha > 0 and labeled.any():
        total = total + cfg.alpha * F.cross_entropy(student[labeled], labels[labeled])
    if teacher is not None and cfg.lam > 0:
        batch = teacher if isinstance(teacher, dict) else {"logits": teacher}
        total = total + teacher_term(student, batch, cfg)
    return total
