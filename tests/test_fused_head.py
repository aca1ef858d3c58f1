"""The fused output head + objective against the unfused torch path: values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import Distance, LossConfig
from pipeline.fused_head import FUSED_DISTANCES, head_loss
from pipeline.losses import teacher_term
from pipeline.representations import sample_counts

N, H, V = 37, 8, 50


def batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -1  # unlabeled rows (a document's last token, a user turn)
    tmask = np.ones(N, bool)
    tmask[::7] = False  # rows without a teacher row
    tmask[-4:] = False
    val, idx = torch.topk(t, 6)
    idx[3, 4:], val[3, 4:] = -1, -np.inf  # an adaptive row's padding
    sid, cnt = sample_counts(t, 8, 2.0, torch.Generator().manual_seed(1))
    teacher = {"topk_idx": idx.int().numpy(), "topk_val": val.float().numpy(),
               "lse": torch.logsumexp(t / 2.0, -1).float().numpy(), "sampled_idx": sid.numpy(),
               "sampled_cnt": cnt.numpy(), "sampled_ent": np.ones(N, np.float32), "logits": t.float().numpy()}
    if dtype == torch.float64:
        teacher = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in teacher.items()}
    return hidden, weight, bias, labels, tmask, teacher


def unfused(hidden, weight, bias, labels, tmask, teacher, cfg):
    """What stage 3 computes without the fusion: every row's logits, then the objective."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    lab = labels >= 0
    loss = cfg.alpha * F.cross_entropy(logits[lab], labels[lab])
    if cfg.lam > 0:
        loss = loss + teacher_term(logits, teacher, cfg, mask=tmask)
    return loss


@pytest.mark.parametrize("distance", FUSED_DISTANCES)  # every declared distance with a kernel
@pytest.mark.parametrize("chunk", [5, 37, 64])  # does not divide 33 computed rows, covers them, exceeds them
def test_the_fused_head_equals_the_unfused_path(distance, chunk):
    hidden, weight, bias, labels, tmask, teacher = batch()
    cfg = LossConfig(distance=Distance(distance), alpha=0.7, lam=1.3, temperature=2.0, beta=0.3)
    got, want = [], []
    for fn, out in ((lambda *a: head_loss(*a[:4], a[5], cfg, teacher_mask=a[4], chunk_rows=chunk), got),
                    (lambda *a: unfused(*a, cfg), want)):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss = fn(h, w, b, labels, tmask, teacher)
        loss.backward()
        out.extend([loss.detach(), h.grad, w.grad, b.grad])
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-5, atol=2e-6, msg=name)
    skipped = ~((labels.numpy() >= 0) | tmask)
    assert skipped.any() and (got[1][torch.from_numpy(skipped)] == 0).all()  # rows with nothing to learn


def test_labels_only_and_no_bias():
    hidden, weight, _, labels, tmask, teacher = batch()
    cfg = LossConfig(distance=Distance.topk_kl, alpha=1.0, lam=0.0, temperature=1.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_loss(h, w, None, labels, None, cfg, chunk_rows=4)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = unfused(h2, w2, None, labels, tmask, teacher, cfg)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    torch.testing.assert_close(h.grad, h2.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("distance", ["topk_kl", "sampled_kl", "kl"])
def test_gradcheck_in_float64(distance):
    hidden, weight, bias, labels, tmask, teacher = batch(torch.float64)
    cfg = LossConfig(distance=Distance(distance), alpha=0.5, lam=2.0, temperature=2.0)
    inputs = tuple(x[:12].clone().requires_grad_() if x is hidden else x.clone().requires_grad_()
                   for x in (hidden, weight, bias))
    part = {k: v[:12] for k, v in teacher.items()}
    assert torch.autograd.gradcheck(lambda h, w, b: head_loss(h, w, b, labels[:12], part, cfg,
                                                               teacher_mask=tmask[:12], chunk_rows=5), inputs)
