"""The training loop, one for every model this project trains: the built-in teacher on
labels, classifier students from the cache or from labels alone, causal LM students from
a token cache.

:func:`train` runs a fixed number of optimizer steps (AdamW, cosine decay to zero) over
the epochs of a resumable stream (anything with ``state_dict`` / ``load_state_dict`` and
an ``__iter__`` that yields the rest of its current epoch). With a ``state_path`` it saves
model, optimizer, schedule, stream position, torch's RNG and the step at the end of every
epoch (and every ``checkpoint_every`` steps), so a killed run resumes to the same steps and
weights; a finished one is not trained again. Gradient accumulation, norm clipping, a
linear warmup before the cosine decay and bf16 autocast are options. The loss is checked
every 50 steps: a non-finite one stops the run with advice. Under ``torchrun`` the model is
wrapped in DistributedDataParallel (each process reads its own slice of every batch; the
stream does the slicing) and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache.storage import write_file_atomic
from pipeline.device import autocast
from pipeline.distances import PROGRESS
from pipeline.errors import DataError
from pipeline.processes import Processes

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # steps between divergence checks (each costs a device sync)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int = 0):
    """AdamW; the learning rate rises linearly over ``warmup_steps``, then decays to zero
    along a cosine over the rest of ``total_steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (min(step, total_steps) - warmup_steps)
                                   / max(total_steps - warmup_steps, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_loss(loss: torch.Tensor, desc: str) -> float:
    """The loss as a float; a NaN or infinite one stops training, saying what to do."""
    value = float(loss.item())
    if not math.isfinite(value):
        raise RuntimeError(f"{desc}: training diverged (loss={value}); lower the learning rate (train.lr) or check "
                           "the teacher's cached values (stage 2 audits them)")
    return value


def save_state(path: str, **state) -> None:
    """Serialized in memory, then written whole (temporary name, rename): a kill or a full
    disk mid-save leaves the previous checkpoint whole and no temporary behind."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_file_atomic(path, buf.getvalue(), "free space or fix the permissions, then re-run: training resumes "
                                            "from the last checkpoint written")


def process_group(device: torch.device, processes: Processes) -> tuple[int, int]:
    """(rank, world size) of this process. Under ``torchrun`` the process group is joined
    first (torch reads its address from torchrun's environment): gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if processes.torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return joined_group()


def joined_group() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    """True unless this is a process other than rank 0 of a process group."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _mean_over_processes(loss: torch.Tensor, world: int) -> torch.Tensor:
    """The loss averaged over the processes (what DistributedDataParallel's averaged gradient
    descends), for reporting; the local loss in one process."""
    if world == 1:
        return loss
    import torch.distributed as dist

    loss = loss.clone()
    dist.all_reduce(loss)
    return loss / world


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def train(model: nn.Module, stream, steps: int, loss_fn: Callable[[nn.Module, object], torch.Tensor], *,
          lr: float, weight_decay: float, desc: str, batches: Callable[[], Iterable] | None = None,
          state_path: str | None = None, checkpoint_every: int = 0, accumulate: int = 1, clip_norm: float = 0.0,
          warmup_steps: int = 0, precision: str = "fp32") -> tuple[int, float]:
    """Run ``steps`` optimizer steps of ``loss_fn(model, batch)`` over ``stream``'s epochs
    (``batches()``: the rest of the current epoch, as the loss takes it; default: the
    stream itself). Each step sums the gradients of ``accumulate`` batches (each loss
    divided by ``accumulate``), clips their global norm to ``clip_norm`` (0: no clipping)
    and steps; the loss runs under autocast for ``precision`` bf16/fp16. Returns the steps
    taken and the last loss."""
    opt, sched = make_optimizer(model, lr, weight_decay, steps, warmup_steps)
    step, loss = 0, float("nan")
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        stream.load_state_dict(st["stream"])
        torch.set_rng_state(st["rng"])
        step, loss = st["step"], st.get("loss", loss)
        log.info("%s: resuming from %s at step %d/%d (epoch %d)", desc, state_path, step, steps, stream.epoch)

    def save() -> None:
        if state_path and rank == 0:
            save_state(state_path, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                       stream=stream.state_dict(), rng=torch.get_rng_state(), step=step, loss=loss)

    batches = batches or (lambda: stream)
    device = next(model.parameters()).device
    rank, world = joined_group()  # a task joins the group (process_group) when its students train across processes
    net = model  # what the loss calls: across processes, a DistributedDataParallel that averages gradients
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model.train()
    opt.zero_grad(set_to_none=True)
    micro = 0  # batches whose gradients wait for the next step
    with tqdm(total=steps, initial=step, desc=desc, unit="step", leave=False) as bar:
        while step < steps:
            served, fresh = 0, getattr(stream, "position", 0) == 0
            for batch in batches():
                PROGRESS.set(step / steps)  # (a scheduled distance's weight: TAID)
                with autocast(device, precision):
                    out = loss_fn(net, batch)
                (out / accumulate if accumulate > 1 else out).backward()
                micro, served = micro + 1, served + 1
                if micro < accumulate:
                    continue
                micro = 0
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                if step % CHECK_EVERY == 0 or step == steps:
                    loss = check_loss(_mean_over_processes(out.detach(), world), desc)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if step >= steps:
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    save()
            else:
                if not served and fresh:
                    raise DataError(f"{desc}: an epoch of the stream yielded no batch; it holds no rows to train on")
                if not micro:
                    save()  # the epoch's end (with a step's batches pending across it, the next step's)
    save()
    PROGRESS.set(1.0)
    return step, loss
