"""The output head and the objective together, chunk by chunk: no (rows x vocabulary) logits.

A causal LM student's step would otherwise hold its float32 logits for every token of the
batch (16 x 512 tokens x 49,152 x 4 B = 1.6 GB), their gradient, and the loss's
intermediates. Here, for each chunk of ``chunk_rows`` rows of the final hidden states h:

    logits = h @ W^T (+ b)                           (chunk, V), then dropped
    d loss / d logits                                 the kernels, loss and gradient in one pass
    grad h[chunk] = d @ W,   grad W += d^T @ h,   grad b += sum(d)

On CPU the distance is the Numba kernel (:mod:`pipeline.kernels`) and the cross-entropy a
Numba kernel that adds its gradient into the same buffer; on other devices the same chunks
go through the torch losses and ``torch.autograd.grad``. Only the rows that carry a label
or a teacher row are computed (padding costs nothing). The objective is stage 3's:
``alpha * mean CE over labeled rows + lam * mean D over teacher rows`` (each mean over the
whole batch, not per chunk). The gradients are kept from the forward and handed to
autograd in backward, as :class:`pipeline.losses._Kernel` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import kernels
from pipeline.cache.format import REPRESENTATIONS
from pipeline.distances import distance_spec, names
from pipeline.errors import ConfigError
from pipeline.kernels import sparse
from pipeline.losses import teacher_term

FUSED_DISTANCES = names(fused=True)  # those with a Numba kernel


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, gh, gw, gb = run(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
        ctx.save_for_backward(gh, gw, *(() if gb is None else (gb,)))
        return loss

    @staticmethod
    def backward(ctx, g):
        gh, gw, *gb = ctx.saved_tensors
        return g * gh, g * gw, (g * gb[0]) if gb else None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels, teacher: dict | None,
              cfg, *, teacher_mask=None, chunk_rows: int = 1024) -> torch.Tensor:
    """``alpha * CE + lam * D`` of the logits ``hidden @ weight.T + bias``, never all of
    them at once. hidden (N, H); weight (V, H); labels (N,) int, -1 for none; ``teacher``:
    the batch's cache arrays (rows aligned with hidden) as :func:`pipeline.losses.select_teacher`
    gives them, or None; ``teacher_mask`` (N,) bool: the rows the distance reads; ``cfg``:
    the loss section (``alpha``, ``lam``, ``distance``, ``temperature``, ``beta``)."""
    name = cfg.distance.value
    lam = cfg.lam if teacher is not None else 0.0
    if lam > 0 and name not in FUSED_DISTANCES:
        raise ConfigError(f"lm.fused_head: loss.distance={name} has no fused form (it is plain torch): set "
                         f"lm.fused_head=false")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, np.int64)
    n = len(labels)
    tmask = np.ones(n, bool) if teacher_mask is None else np.asarray(teacher_mask, bool)
    tmask = tmask & (lam > 0)
    has_label = (labels >= 0) & (cfg.alpha > 0)
    rows = np.flatnonzero(has_label | tmask)  # the rest cost nothing
    n_ce, n_t = int(has_label.sum()), int(tmask.sum())
    w_ce = cfg.alpha / n_ce if n_ce else 0.0
    w_t = lam / n_t if n_t else 0.0
    at = torch.from_numpy(rows).to(hidden.device)

    def run(h_all, w, b):
        dt = torch.promote_types(h_all.dtype, torch.float32)  # float32 logits (float64 stays: gradcheck)
        h = h_all.index_select(0, at).to(dt)
        wf, bf = w.to(dt), None if b is None else b.to(dt)
        gh = torch.zeros_like(h)
        gw = torch.zeros_like(wf)
        gb = None if b is None else torch.zeros_like(bf)
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, len(rows), chunk_rows):
            r = rows[a:a + chunk_rows]
            hc = h[a:a + len(r)]
            z = hc @ wf.T if bf is None else torch.addmm(bf, hc, wf.T)
            part = {k: v[r] for k, v in teacher.items()} if n_t else {}
            if z.device.type == "cpu":
                loss, gz = _chunk_cpu(z, labels[r], has_label[r], tmask[r], part, name, cfg, w_ce, w_t)
            else:
                loss, gz = _chunk_torch(z, labels[r], has_label[r], tmask[r], part, name, cfg, w_ce, w_t)
            total += loss
            gh[a:a + len(r)] = gz @ wf
            gw.addmm_(gz.T, hc)
            if gb is not None:
                gb += gz.sum(0)
            del z, gz
        full = torch.zeros(h_all.shape, dtype=h_all.dtype, device=h_all.device)
        full.index_copy_(0, at, gh.to(h_all.dtype))
        return (total.to(device=h_all.device, dtype=dt), full, gw.to(w.dtype),
                None if gb is None else gb.to(b.dtype))

    return _Head.apply(hidden, weight, bias, run)


def _chunk_cpu(z, labels, has_label, tmask, teacher, name, cfg, w_ce, w_t):
    """One chunk on CPU: the distance's kernel writes its loss and gradient, the
    cross-entropy kernel adds its own into the same buffer."""
    zn = z.numpy()
    loss = 0.0
    grad = None
    if tmask.any():
        spec = distance_spec(name)
        arrays = (np.asarray(teacher[a]) for a in REPRESENTATIONS[spec.reads].arrays)
        loss, grad = getattr(kernels, spec.kernel)(zn, *arrays, temperature=cfg.temperature, beta=spec.beta_of(cfg.beta),
                                                   mask=tmask, reduction="sum", coef=w_t)
    add = grad is not None
    if grad is None:
        grad = np.empty_like(zn)
    ce = np.empty(len(zn), zn.dtype)
    sparse.ce_rows(zn, np.where(has_label, labels, -1), np.full(len(zn), w_ce), ce, grad, add)
    return loss + float(ce.sum()), torch.from_numpy(grad)


def _chunk_torch(z, labels, has_label, tmask, teacher, name, cfg, w_ce, w_t):
    """One chunk elsewhere (CUDA): the torch losses, differentiated by autograd."""
    z = z.detach().requires_grad_()
    loss = z.new_zeros(())
    lab = torch.from_numpy(np.flatnonzero(has_label)).to(z.device)
    if len(lab):
        y = torch.from_numpy(labels[has_label]).to(z.device)
        loss = loss + w_ce * F.cross_entropy(z.index_select(0, lab), y, reduction="sum")
    if tmask.any():
        t = {k: torch.as_tensor(v).to(z.device) for k, v in teacher.items()}
        loss = loss + teacher_term(z, t, cfg, tmask, reduction="sum", coef=w_t)
    (gz,) = torch.autograd.grad(loss, z)
    return float(loss), gz
