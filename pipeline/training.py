"""Training loops: fitting the built-in teacher on labels, training students from a
stream of cached teacher logits, and evaluation."""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache.storage import write_file_atomic

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, dict | None]  # x (B, L), y (B,), cached teacher arrays for the batch


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a cosine decay to zero over ``total_steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))
    return opt, sched


def label_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled mini-batches of (x, y) for label-only training."""
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    while True:
        order = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            yield xt[idx], yt[idx], None


def optimizer_step(model: nn.Module, opt, sched, batch: Batch, loss_fn: Callable, device: torch.device) -> torch.Tensor:
    """One step of ``loss_fn(logits, y, teacher)`` on ``batch``; returns the loss."""
    x, y, t = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type != "cpu" and t is not None:  # CPU kernels read the NumPy arrays directly
        t = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in t.items()}
    loss = loss_fn(model(x), y, t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss


def _report(bar, loss: torch.Tensor, desc: str) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"{desc}: training diverged (loss={loss.item()}); lower the learning rate")
    bar.set_postfix(loss=f"{loss.item():.4f}")


def train_steps(model: nn.Module, batches: Iterator[Batch], steps: int, loss_fn: Callable,
                *, lr: float, weight_decay: float, desc: str) -> float:
    """Run ``steps`` optimizer steps of ``loss_fn(logits, y, teacher)``; return the last loss."""
    opt, sched = make_optimizer(model, lr, weight_decay, steps)
    model.train()
    device = next(model.parameters()).device
    loss = torch.tensor(float("nan"))
    with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(steps):
            loss = optimizer_step(model, opt, sched, next(batches), loss_fn, device)
            bar.update()
            if bar.n % 50 == 0 or bar.n == steps:
                _report(bar, loss, desc)
    return float(loss.item())


def _save_state(path: str, **state) -> None:
    """Serialized in memory, then written whole (temporary name, rename): a kill or a full
    disk mid-save leaves the previous epoch's state whole and no temporary behind."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_file_atomic(path, buf.getvalue(), "free space or fix the permissions, then re-run: training resumes "
                                            "from the last checkpoint written")


def train_epochs(model: nn.Module, stream, epoch_batches: Callable[[], Iterator[Batch]], epochs: int,
                 loss_fn: Callable, *, lr: float, weight_decay: float, desc: str, state_path: str | None) -> int:
    """Train for ``epochs`` passes of ``stream``, checkpointing model, optimizer, schedule,
    stream position and RNG at the end of every epoch to ``state_path``; a restart resumes
    from the last one and ends with the same number of optimizer steps. Returns the steps."""
    total = epochs * len(stream)
    opt, sched = make_optimizer(model, lr, weight_decay, total)
    step = 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        stream.load_state_dict(st["stream"])
        torch.set_rng_state(st["rng"])
        step = st["step"]
        log.info("%s: resuming from %s at epoch %d/%d (step %d)", desc, state_path, stream.epoch, epochs, step)
    model.train()
    device = next(model.parameters()).device
    with tqdm(total=total, initial=step, desc=desc, unit="step", leave=False) as bar:
        while stream.epoch < epochs:
            for batch in epoch_batches():
                loss = optimizer_step(model, opt, sched, batch, loss_fn, device)
                step += 1
                bar.update()
                if step % 50 == 0:
                    _report(bar, loss, desc)
            if state_path:
                _save_state(state_path, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), stream=stream.state_dict(), rng=torch.get_rng_state(),
                            step=step)
    return step


def ce_loss(logits: torch.Tensor, y: torch.Tensor, _t=None) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def fit_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                   lr: float, weight_decay: float, seed: int, desc: str) -> float:
    """Fit on labels alone for ``epochs`` passes; deterministic for ``seed``."""
    torch.manual_seed(seed)
    steps = epochs * max(len(y) // batch_size, 1)
    return train_steps(model, label_batches(x, y, batch_size, seed), steps, ce_loss,
                       lr=lr, weight_decay=weight_decay, desc=desc)


@torch.inference_mode()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())
