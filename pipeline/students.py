"""One student run for every task: the engine trains what a task describes.

A task says what a student is (:class:`StudentRun`: its models, each :class:`Fit`'s
stream and loss, how it is evaluated and saved); this module owns the sequence every
task shares: the device and the process group, the number of optimizer steps, the
resumable state (keyed by the cache and everything that defines the student), the fit,
the evaluation on rank 0, the saved checkpoints and the results row (with the
leaderboard's key and settings columns).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.device import PRECISION_MEMO, choose_device, resolve_precision
from pipeline.hashing import hash_json, plain
from pipeline.training import joined_group, process_group, train

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """One model trained for the run's steps: its stream (resumable), its loss
    ``loss(model, batch)`` and, when the loss takes something else than what the stream
    yields, ``batches()`` (the rest of the stream's epoch, as the loss takes it)."""

    label: str  # the saved folder's name, and the progress bar's
    model: nn.Module
    stream: object
    loss: Callable[[nn.Module, object], torch.Tensor]
    batches: Callable[[], Iterable] | None = None
    resumable: bool = True  # keeps its state between runs (train.resume); a baseline need not


@dataclass
class StudentRun:
    """One results row: a configured student trained by :func:`train_student`.

    ``fits[0]`` is the student; its stream sets the number of steps every other fit (a
    baseline) takes too. ``evaluate(models)`` (rank 0; the models by fit label) gives the
    row's evaluation fields; ``save(model, folder)`` writes one trained model."""

    name: str  # the config's student key
    label: str  # what tells runs of one student apart: the distance, or the LM variant
    identity: dict  # everything that defines the trained student (:func:`student_identity`)
    fits: list[Fit]
    evaluate: Callable[[dict[str, nn.Module]], dict]
    save: Callable[[nn.Module, str], None]
    row: dict = field(default_factory=dict)  # the task's fields known before training
    throughput: tuple[str, int] | None = None  # (row field, units per optimizer step): units per second


def student_identity(spec, loss, train_cfg: TrainConfig) -> dict:
    """Everything that defines a trained student: its architecture, the loss and its
    settings, the training settings (seed and device included: numerics differ; not
    ``resume`` or ``checkpoint_every``, which only say whether and how often to save)."""
    t = {k: v for k, v in asdict(train_cfg).items() if k not in ("resume", "checkpoint_every")}
    return {"student": asdict(spec), "loss": asdict(loss), "train": t}


def flatten_settings(identity: dict) -> dict:
    """A student's identity flattened to ``section.field: value`` (the leaderboard's columns)."""
    out = {}
    for section, values in identity.items():
        if isinstance(values, dict):
            out |= {f"{section}.{k}": plain(v) for k, v in values.items()}
        else:
            out[section] = plain(values)
    return out


def state_path(root: str, reader: CacheReader, name: str, identity: dict) -> str:
    """Where a student's training state lives between runs: keyed by the cache and the
    student's identity, so only the same run resumes it."""
    cache = os.path.basename(reader.path.rstrip("/"))
    return os.path.join(root, "students", cache, f"{name}-{hash_json(identity)[:12]}", "state.pt")


def count_steps(train_cfg: TrainConfig, stream) -> int:
    """``train.steps`` when set, else ``train.epochs`` passes of ``stream`` (in optimizer
    steps of ``train.grad_accum`` batches)."""
    t = train_cfg
    return t.steps or max(t.epochs * len(stream) // t.grad_accum, 1)


def linear_shapes(model: nn.Module, most: int = 6) -> list[tuple[int, int]]:
    """A model's distinct linear layers as (in, out) features (outputs cut at 2,048: a
    vocabulary head's speed per FLOP is its slice's): what ``precision=auto`` measures."""
    shapes = dict.fromkeys((m.in_features, min(m.out_features, 2048)) for m in model.modules()
                           if isinstance(m, nn.Linear))
    return list(shapes)[:most] or [(512, 512)]


def fit(model: nn.Module, stream, steps: int, loss_fn, train_cfg: TrainConfig, *, desc: str, batches=None,
        state: str | None = None, memo: str | None = None) -> tuple[float, float]:
    """Train ``model`` for ``steps`` optimizer steps with the run's optimizer settings;
    (last loss, seconds). ``train.precision=auto`` is measured on the model's linear layers
    (kept in ``memo``, :func:`pipeline.device.resolve_precision`)."""
    t = train_cfg
    precision = t.precision.value
    if precision == "auto":  # (the layer walk only where it is measured)
        precision = resolve_precision(precision, next(model.parameters()).device, linear_shapes(model), memo)
    t0 = time.perf_counter()
    done, loss = train(model, stream, steps, loss_fn, lr=t.lr, weight_decay=t.weight_decay, desc=desc,
                       batches=batches, state_path=state, checkpoint_every=t.checkpoint_every,
                       accumulate=t.grad_accum, clip_norm=t.clip_norm, warmup_steps=t.warmup_steps,
                       precision=precision)
    if done != steps:
        raise RuntimeError(f"{desc}: {done} optimizer steps instead of {steps}")
    return loss, time.perf_counter() - t0


def train_student(run: StudentRun, reader: CacheReader, train_cfg: TrainConfig, *, root: str,
                  save_dir: str | None = None, memo: str | None = None) -> dict:
    """Fit each of ``run``'s models for the same steps, then (rank 0) evaluate and save
    them; the results row. ``memo``: where ``train.precision=auto`` keeps its measurement."""
    rank, world = joined_group()
    student = run.fits[0]
    steps = count_steps(train_cfg, student.stream)
    models, seconds, final = {}, 0.0, float("nan")
    for f in run.fits:
        state = None
        if f.resumable and train_cfg.resume:
            state = state_path(root, reader, f"{run.name}-{run.label.replace(':', '-')}", run.identity)
        loss, took = fit(f.model, f.stream, steps, f.loss, train_cfg, desc=f"{run.name}: {f.label}",
                         batches=f.batches, state=state, memo=memo)
        models[f.label] = f.model
        if f is student:
            final, seconds = loss, took
    row = {"student": run.name, "key": f"{run.name}-{hash_json(run.identity)[:12]}",  # the leaderboard's row
           "settings": flatten_settings(run.identity), **run.row, "steps": steps,
           "params": sum(p.numel() for p in student.model.parameters()), "processes": world,
           "train_s": round(seconds, 2), "final_loss": final}
    if run.throughput:
        name, per_step = run.throughput
        row[name] = steps * per_step * world / seconds
    if rank != 0:
        return row  # rank 0 evaluates and saves
    row |= run.evaluate(models)
    if save_dir:
        for label, model in models.items():
            folder = os.path.join(save_dir, run.name, label.replace(":", "-"))
            run.save(model, folder)
            row.setdefault("checkpoint", folder)
    return row


def train_students(task, data, reader: CacheReader, run_dir: str) -> list[dict]:
    """Every student the task's config names, one results row each (stage 3)."""
    device = choose_device(task.cfg.train.device)
    process_group(device, task.processes)
    memo = os.path.join(task.cfg.paths.conversions, PRECISION_MEMO)
    return [train_student(run, reader, task.cfg.train, root=task.root, save_dir=os.path.join(run_dir, "students"),
                          memo=memo) for run in task.student_runs(data, reader, device)]


__all__ = ["Fit", "StudentRun", "count_steps", "fit", "flatten_settings", "state_path", "student_identity",
           "train_student", "train_students"]
