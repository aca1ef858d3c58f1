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
from pipeline.cache.format import REPRESENTATIONS
from pipeline.distances import distance_spec
from pipeline.errors import ConfigError

_EPS = 1e-8


class _Kernel(torch.autograd.Function):
    """Bridge: ``call(student_numpy) -> (loss, grad)``, grad = d loss / d student."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, call: Callable) -> torch.Tensor:
        loss, grad = call(student.detach().contiguous().numpy())
        ctx.save_for_backward(torch.from_numpy(grad))
        ctx.per_row = isinstance(loss, np.ndarray)  # reduction="none": (B,) losses, else a float
        return torch.from_numpy(loss).to(student.dtype) if ctx.per_row else torch.tensor(loss, dtype=student.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors  # never scaled in place: backward may run again (retain_graph)
        if ctx.per_row:
            return g.unsqueeze(1) * grad, None
        # g == 1 (the usual case: the loss weight is folded into the kernel via `coef`): hand
        # the kernel's gradient over as is; autograd copies it if anything else still holds it
        return (grad if g.item() == 1 else g * grad), None


def _np(x) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --- plain torch: the CUDA path and the benchmark's reference ------------------------------


def _log_softmaxes(s, t, temperature):
    return F.log_softmax(t.to(s.dtype) / temperature, dim=-1), F.log_softmax(s / temperature, dim=-1)


def torch_kl(s, t, temperature=1.0, beta=0.5):
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def torch_reverse_kl(s, t, temperature=1.0, beta=0.5):
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1)


def torch_js(s, t, temperature=1.0, beta=0.5):
    if beta in (0, 1):
        return (torch_kl if beta == 0 else torch_reverse_kl)(s, t, temperature)
    log_p, log_q = _log_softmaxes(s, t, temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return temperature**2 * d


def _log_mixture(log_a, log_b, beta):
    """log(beta a + (1 - beta) b) from log-probabilities; exactly log b at beta=0, log a at 1."""
    if beta in (0, 1):
        return log_b if beta == 0 else log_a
    return torch.logaddexp(log_a + np.log(beta), log_b + np.log(1 - beta))


def _skewed(log_a, log_b, beta):
    """KL(a || beta a + (1 - beta) b) per row, from log-probabilities (beta=1: 0, beta=0: KL(a || b))."""
    return (log_a.exp() * (log_a - _log_mixture(log_a, log_b, beta))).sum(-1)


def torch_skew_kl(s, t, temperature=1.0, beta=0.1):
    """DistiLLM's skew KL: KL(p || beta p + (1 - beta) q) at temperature T, times T^2."""
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * _skewed(log_p, log_q, beta)


def torch_skew_reverse_kl(s, t, temperature=1.0, beta=0.1):
    """DistiLLM's skew reverse KL: KL(q || beta q + (1 - beta) p) at temperature T, times T^2."""
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * _skewed(log_q, log_p, beta)


def torch_mse(s, t, temperature=1.0, beta=0.5):
    return ((s - t.to(s.dtype)) ** 2).mean(-1)


def torch_cosine(s, t, temperature=1.0, beta=0.5):
    t = t.to(s.dtype)
    return 1 - (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(_EPS) * t.norm(dim=-1).clamp_min(_EPS))


def torch_euclidean(s, t, temperature=1.0, beta=0.5):
    return (s - t.to(s.dtype)).norm(dim=-1)


def torch_tv(s, t, temperature=1.0, beta=0.5):
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)


def torch_distance(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0,
                   beta: float = 0.5) -> torch.Tensor:
    """Per-row dense distance (B,) in plain torch, same definitions as the kernels."""
    spec = distance_spec(name)
    if spec.reads != "full":
        raise ValueError(f"distance {name!r} reads the {spec.reads!r} representation, not full logits")
    return globals()[spec.reference](s, t, temperature, beta)


def _student_buckets(log_q: torch.Tensor, at: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's side of a sparse row: log q at the teacher's entries (B, K; ``at`` their
    ids, clamped) and its mass outside the entries that ``held`` marks, summed directly (no
    1 - sum(q_k) cancellation)."""
    kept = torch.zeros_like(log_q, dtype=torch.int32).scatter_add_(1, at, held.int()) > 0
    return log_q.gather(1, at), log_q.exp().masked_fill(kept, 0).sum(-1)


def torch_topk_kl(s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, lse: torch.Tensor,
                  temperature: float, beta: float = 0.5) -> torch.Tensor:
    log_q = F.log_softmax(s / temperature, dim=-1)
    held = idx >= 0  # -1: padding (an adaptive row's unused entries), skipped
    log_p = torch.where(held, val.to(s.dtype) / temperature - lse.to(s.dtype).unsqueeze(-1), 0)  # (B, K)
    p = torch.where(held, log_p.exp(), 0)
    log_qk, q_tail = _student_buckets(log_q, idx.long().clamp_min(0), held)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    tail = torch.where((p_tail > 0) & (q_tail > 0), p_tail * (p_tail.clamp_min(1e-38).log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    return temperature**2 * ((p * (log_p - log_qk)).sum(-1) + tail)


def torch_sampled_kl(s: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, ent: torch.Tensor,
                     temperature: float, beta: float = 0.5) -> torch.Tensor:
    log_q = F.log_softmax(s / temperature, dim=-1)
    w = cnt.to(s.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1)  # rows without draws (padding): 0, not 0/0
    return temperature**2 * (-(w * log_q.gather(1, idx.long().clamp_min(0))).sum(-1) - ent.to(s.dtype))


TINY = 1e-37  # the skewed KLs' floor under a mixture: a bucket only the other side holds, at b = 0


def _bucket_skew(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(A || beta A + (1 - beta) B) per row between distributions over buckets, given as
    probabilities (B, n); a bucket A does not hold adds nothing, the mixture is floored at
    TINY (as the kernels floor it)."""
    m = (beta * a + (1 - beta) * b).clamp_min(TINY)
    return torch.where(a > 0, a * (a.clamp_min(TINY).log() - m.log()), 0).sum(-1)


def _topk_bucket_pair(s, idx, val, lse, temperature):
    """A top-K row as K+1 buckets, the K cached classes and the tail (the rest of the
    vocabulary, the exact logsumexp giving its teacher mass): the teacher's probabilities
    and the student's (B, K+1), 0 on padding entries."""
    held = idx >= 0
    log_qk, q_tail = _student_buckets(F.log_softmax(s / temperature, dim=-1), idx.long().clamp_min(0), held)
    p = torch.where(held, (val.to(s.dtype) / temperature - lse.to(s.dtype).unsqueeze(-1)).exp(), 0)
    q = torch.where(held, log_qk.exp(), 0)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    return torch.cat([p, p_tail[:, None]], 1), torch.cat([q, q_tail[:, None]], 1)


def _sampled_bucket_pair(s, idx, cnt, temperature):
    """A sampled row as buckets: the drawn ids, the teacher's side their frequencies (the
    draws' empirical distribution), and the rest of the vocabulary (teacher 0); (B, S+1)."""
    held = cnt > 0
    log_qk, q_rest = _student_buckets(F.log_softmax(s / temperature, dim=-1), idx.long().clamp_min(0), held)
    w = cnt.to(s.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1)
    q = torch.where(held, log_qk.exp(), 0)
    return torch.cat([w, torch.zeros_like(w[:, :1])], 1), torch.cat([q, q_rest[:, None]], 1)


def torch_skew_kl_topk(s, idx, val, lse, temperature=1.0, beta=0.1):
    p, q = _topk_bucket_pair(s, idx, val, lse, temperature)
    return temperature**2 * _bucket_skew(p, q, beta)


def torch_skew_reverse_kl_topk(s, idx, val, lse, temperature=1.0, beta=0.1):
    p, q = _topk_bucket_pair(s, idx, val, lse, temperature)
    return temperature**2 * _bucket_skew(q, p, beta)


def torch_skew_kl_sampled(s, idx, cnt, ent, temperature=1.0, beta=0.1):
    p, q = _sampled_bucket_pair(s, idx, cnt, temperature)
    return temperature**2 * _bucket_skew(p, q, beta)


def torch_skew_reverse_kl_sampled(s, idx, cnt, ent, temperature=1.0, beta=0.1):
    p, q = _sampled_bucket_pair(s, idx, cnt, temperature)
    return temperature**2 * _bucket_skew(q, p, beta)


def _taid_target(p: torch.Tensor, q: torch.Tensor, t: float) -> torch.Tensor:
    """TAID's target over buckets: proportional to q^(1-t) p^t, the student's side detached."""
    q = q.detach()
    if t <= 0:
        return q
    if t >= 1:
        return p
    m = torch.where((p > 0) & (q > 0), torch.exp((1 - t) * q.clamp_min(TINY).log() + t * p.clamp_min(TINY).log()),
                    0)
    return m / m.sum(-1, keepdim=True).clamp_min(TINY)


def torch_taid(s, t, temperature=1.0, beta=1.0):
    """TAID from full logits: KL(p_t || q), p_t = softmax(((1-b) s + b t) / T), s detached."""
    log_pt = F.log_softmax(((1 - beta) * s.detach() + beta * t.to(s.dtype)) / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_q)).sum(-1)


def torch_taid_topk(s, idx, val, lse, temperature=1.0, beta=1.0):
    p, q = _topk_bucket_pair(s, idx, val, lse, temperature)
    return temperature**2 * _bucket_skew(_taid_target(p, q, beta), q, 0.0)


def torch_taid_sampled(s, idx, cnt, ent, temperature=1.0, beta=1.0):
    p, q = _sampled_bucket_pair(s, idx, cnt, temperature)
    return temperature**2 * _bucket_skew(_taid_target(p, q, beta), q, 0.0)


def _akl(p: torch.Tensor, q: torch.Tensor, held: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """AKL (Wu et al., 2024) per row between distributions over buckets (B, n) (``held``:
    the buckets that exist): wf KL(P || Q) + (1 - wf) KL(Q || P), wf = g_head / (g_head +
    g_tail) held constant, the tail the least likely buckets whose running teacher mass from
    the least stays under kernels.AKL_MU (the kernel's rule: equal masses taken from the
    last); ``rank`` orders the buckets where p does not."""
    key = torch.where(held, p if rank is None else rank, torch.inf).flip(-1)  # (flipped: ties from the last)
    order = held.shape[-1] - 1 - key.sort(dim=-1, stable=True).indices
    running = torch.where(held, p, 0).gather(1, order).cumsum(-1)
    tail = torch.zeros_like(held).scatter(1, order, running < kernels.AKL_MU) & held
    gap = torch.where(held, (p - q).abs(), 0).detach()
    g_head, g_tail = (gap * ~tail).sum(-1), (gap * tail).sum(-1)
    wf = torch.where(g_head + g_tail > 0, g_head / (g_head + g_tail).clamp_min(TINY), 0.5)
    return wf * _bucket_skew(p, q, 0.0) + (1 - wf) * _bucket_skew(q, p, 0.0)


def torch_akl(s, t, temperature=1.0, beta=0.5):
    """AKL from full logits: every class a bucket."""
    log_p, log_q = _log_softmaxes(s, t, temperature)
    return temperature**2 * _akl(log_p.exp(), log_q.exp(), torch.ones_like(log_p, dtype=torch.bool))


def torch_akl_topk(s, idx, val, lse, temperature=1.0, beta=0.5):
    """AKL over the top-K classes plus the tail bucket (the tail bucket counts whole: its
    classes are each less likely than every cached one)."""
    p, q = _topk_bucket_pair(s, idx, val, lse, temperature)
    held = torch.cat([idx >= 0, torch.ones_like(idx[:, :1], dtype=torch.bool)], 1)
    first = torch.cat([p[:, :-1], torch.full_like(p[:, :1], -1.0)], 1)  # the tail bucket ranks least
    return temperature**2 * _akl(p, q, held, first)


def _torch_reduced(student: torch.Tensor, arrays: tuple, torch_rows: Callable, mask, weights,
                   reduction: str) -> torch.Tensor:
    """The torch rows over the rows that count (mask, weights > 0; the others are not
    computed), weighted and reduced as the kernels reduce."""
    n = len(student)
    w = np.ones(n, np.float64) if weights is None else np.asarray(_np(weights), np.float64)
    if mask is not None:
        w = w * np.asarray(_np(mask), bool)
    at = torch.from_numpy(np.flatnonzero(w > 0)).to(student.device)
    rows = torch_rows(student.index_select(0, at),
                      *(torch.as_tensor(a, device=student.device).index_select(0, at) for a in arrays))
    rows = rows * torch.as_tensor(w[w > 0], device=student.device).to(rows.dtype)
    if reduction == "none":
        return torch.zeros(n, dtype=rows.dtype, device=student.device).index_put((at,), rows)
    total = rows.sum()
    return total / max(float(w.sum()), 1e-30) if reduction == "mean" else total


# --- the public losses ----------------------------------------------------------------------


def _dispatch(student: torch.Tensor, arrays: tuple, torch_rows: Callable, kernel: Callable | None, *, mask,
              weights, reduction: str, coef: float) -> torch.Tensor:
    """CUDA tensors, or a distance without a kernel: the plain torch rows, reduced. CPU
    tensors: the Numba kernel (loss and gradient in one pass) through the autograd bridge,
    on zero-copy NumPy views."""
    if kernel is None or student.device.type != "cpu":
        return coef * _torch_reduced(student, arrays, torch_rows, mask, weights, reduction)
    views = [_np(a) for a in arrays]
    m, w = _np(mask), _np(weights)
    return _Kernel.apply(student, lambda s: kernel(s, *views, mask=m, weights=w, reduction=reduction, coef=coef))


def distance_term(name, student: torch.Tensor, arrays: tuple, *, temperature: float = 1.0, beta: float = 0.5,
                  mask=None, weights=None, reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times the distance ``name`` between (B, V) student logits and the teacher
    ``arrays`` its representation holds (:data:`pipeline.cache.format.REPRESENTATIONS`), by its declaration
    (:mod:`pipeline.distances`): its Numba kernel on CPU, its torch rows elsewhere."""
    spec = distance_spec(name)
    reference = globals()[spec.reference]
    kernel = getattr(kernels, spec.kernel) if spec.kernel else None
    return _dispatch(student, arrays, lambda s, *a: reference(s, *a, temperature, beta),
                     kernel and (lambda s, *a, **kw: kernel(s, *a, temperature=temperature, beta=beta, **kw)),
                     mask=mask, weights=weights, reduction=reduction, coef=coef)


def distance_loss(name: str, student: torch.Tensor, teacher, *, temperature: float = 1.0, beta: float = 0.5,
                  mask=None, weights=None, reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times a dense distance between (B, C) student logits and teacher logits."""
    return distance_term(name, student, (teacher,), temperature=temperature, beta=beta, mask=mask, weights=weights,
                         reduction=reduction, coef=coef)


def topk_kl_loss(student: torch.Tensor, idx, val, lse, *, temperature: float = 1.0, mask=None, weights=None,
                 reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times the top-K + tail KL (:func:`pipeline.kernels.topk_kl`)."""
    return distance_term("topk_kl", student, (idx, val, lse), temperature=temperature, mask=mask, weights=weights,
                         reduction=reduction, coef=coef)


def sampled_kl_loss(student: torch.Tensor, idx, counts, entropy, *, temperature: float = 1.0, mask=None,
                    weights=None, reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times the unbiased sampled KL estimate (:func:`pipeline.kernels.sampled_kl`)."""
    return distance_term("sampled_kl", student, (idx, counts, entropy), temperature=temperature, mask=mask,
                         weights=weights, reduction=reduction, coef=coef)


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


def torch_uld_topk(s, idx, val, lse, temperature=1.0, beta=0.5):
    """Universal Logit Distillation from the top-K: the teacher's K largest probabilities
    at ``temperature`` (its values are sorted; padding ids -1 hold none) and the tail mass."""
    p = torch.where(idx >= 0, torch.exp(val.double() / temperature - lse.double().unsqueeze(-1)), 0)
    p = torch.sort(p, dim=-1, descending=True).values
    return torch_uld(s, p, (1 - p.sum(-1)).clamp(0, 1), temperature)


def torch_uld_sampled(s, idx, cnt, ent, temperature=1.0, beta=0.5):
    """Universal Logit Distillation from the draws' frequencies (they sum to 1: no tail;
    rows without draws are zeros)."""
    c = cnt.double()
    p = torch.sort(c / c.sum(-1, keepdim=True).clamp_min(1), dim=-1, descending=True).values
    return torch_uld(s, p, torch.zeros(len(p), dtype=p.dtype, device=p.device), temperature)


def uld_loss(student: torch.Tensor, p, tail, *, temperature: float = 1.0, mask=None, weights=None,
             reduction: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """``coef`` times Universal Logit Distillation's sorted-probability L1 (Boizard et al.
    2024) between (B, V) student logits and the teacher's sorted probabilities ``p`` (B, K)
    and tail mass (B,). Plain torch on every device (a top-K selection per row); masked rows
    are not computed."""
    return coef * _torch_reduced(student, (p, tail), lambda s, p, tail: torch_uld(s, p, tail, temperature), mask,
                                 weights, reduction)


# --- the objective: which cache arrays a distance reads, and the loss over them -------------


def teacher_arrays(m, loss) -> tuple[tuple[str, ...], int]:
    """The cache arrays ``loss`` (a ``loss.*`` section) trains from, and which column of
    ``lse`` holds its temperature; nothing when ``loss.lam`` is 0 (labels alone). A cache
    (its manifest ``m``) that lacks them is refused, saying what to capture."""
    if loss.lam == 0:
        return (), 0
    name, T = loss.distance.value, loss.temperature
    need = distance_spec(name).reads
    if need not in m.modes:
        raise ConfigError(f"loss.distance={name} trains from the '{need}' representation; the cache holds {m.modes}: "
                          f"capture it with cache.modes=[{need}] (or pick a distance for {m.modes})")
    if need == "topk":
        if T not in m.temperatures:
            raise ConfigError(f"loss.temperature={T}: the cache holds the top-k tail mass only at temperatures "
                              f"{m.temperatures}; use one of them, or re-capture with cache.temperatures")
        if not 0 <= loss.k <= m.k:
            raise ConfigError(f"loss.k={loss.k}: the cache holds the top {m.k} logits per row (0 uses all)")
        return REPRESENTATIONS[need].arrays, m.temperatures.index(T)
    if need == "sampled" and T != m.sample_temperature:
        raise ConfigError(f"loss.temperature={T} but the cache's samples were drawn at T={m.sample_temperature}: "
                          f"set loss.temperature={m.sample_temperature}")
    return REPRESENTATIONS[need].arrays, 0


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
    spec = distance_spec(cfg.distance)
    arrays = tuple(teacher[a] for a in REPRESENTATIONS[spec.reads].arrays)
    if spec.reads == "full" and tuple(arrays[0].shape) != tuple(student.shape):
        raise ConfigError(f"teacher logits {tuple(arrays[0].shape)} and student logits {tuple(student.shape)} "
                          "differ: the student's class count must equal the cache's")
    return distance_term(spec.name, student, arrays, temperature=cfg.temperature, beta=spec.beta_of(cfg.beta), mask=mask,
                         reduction=reduction, coef=cfg.lam if coef is None else coef)


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
