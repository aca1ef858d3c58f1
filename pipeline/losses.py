"""The distillation objective, ``alpha * CE(student, labels) + lam * D(teacher, student)``,
with D computed by the Numba kernels on CPU tensors (zero-copy NumPy views) through a
``torch.autograd.Function``; CUDA tensors take an equivalent plain torch path."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.kernels import kl_forward


class _KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        loss, grad = kl_forward(student.detach().contiguous().numpy(), teacher.detach().contiguous().numpy(),
                                temperature)
        ctx.save_for_backward(torch.from_numpy(grad))
        return torch.from_numpy(loss)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_rows.unsqueeze(1) * grad, None, None


def kl_torch(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``T^2 * KL(p_T || q_T)`` in plain torch (the CUDA path)."""
    log_p = F.log_softmax(teacher.to(student.dtype) / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, shape (B,)."""
    if student.device.type == "cpu":
        return _KLFunction.apply(student, teacher, temperature)
    return kl_torch(student, teacher, temperature)


def distill_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | np.ndarray | None,
                 cfg: LossConfig) -> torch.Tensor:
    """``alpha * CE`` over the labeled rows (labels >= 0) plus ``lam * mean(D)`` over all rows.

    Args:
        student: (B, C) student logits.
        labels: (B,) int64; -1 marks an unlabeled row, which contributes only to D.
        teacher: (B, C) cached teacher logits, or None for label-only training.
    """
    total = student.new_zeros(())
    labeled = labels >= 0
    if cfg.alpha > 0 and labeled.any():
        total = total + cfg.alpha * F.cross_entropy(student[labeled], labels[labeled])
    if teacher is not None and cfg.lam > 0:
        t = torch.as_tensor(teacher)
        if t.shape != student.shape:
            raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(student.shape)} differ: "
                             "the student's class count must equal the cache's")
        total = total + cfg.lam * kl_divergence(student, t, cfg.temperature).mean()
    return total
