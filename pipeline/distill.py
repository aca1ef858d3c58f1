"""Stage 3's core: train each student against the cached teacher logits, and the same
student on labels alone as its baseline, then evaluate both on the test split.

The teacher is never imported or built here: its test-split logits come from the cache.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.cache.fingerprint import hash_json
from pipeline.cache.format import LOGITS, TOP1, TOPK_IDX
from pipeline.config import Config, StudentConfig
from pipeline.datasets import Splits
from pipeline.device import choose_device
from pipeline.losses import distill_loss
from pipeline.models import build_student, count_params, save_checkpoint
from pipeline.stream import CacheStream
from pipeline.training import (
    Batch,
    accuracy,
    ce_loss,
    label_batches,
    predict,
    train_epochs,
    train_steps,
)

log = logging.getLogger(__name__)

TRAIN_SPLITS = ("transfer", "train")


def teacher_arrays(reader: CacheReader, cfg: Config) -> tuple[tuple[str, ...], dict]:
    """The cache arrays the configured distance trains from, and how to slice them; refuses
    a cache that lacks them, saying what to capture."""
    name, m = cfg.loss.distance.value, reader.manifest
    need = {"topk_kl": "topk", "sampled_kl": "sampled"}.get(name, "full")
    if need not in m.modes:
        raise ValueError(f"loss.distance={name} trains from the '{need}' representation; cache {reader.path!r} holds "
                         f"{m.modes}: capture it with cache.modes=[{need}] (or pick a distance for {m.modes})")
    if need == "full":
        return ("logits",), {}
    if need == "topk":
        if cfg.loss.temperature not in m.temperatures:
            raise ValueError(f"loss.temperature={cfg.loss.temperature}: the cache holds the top-k tail mass only at "
                             f"temperatures {m.temperatures}; use one of them, or re-capture with cache.temperatures")
        return ("topk_idx", "topk_val", "lse"), {"lse_column": m.temperatures.index(cfg.loss.temperature)}
    if cfg.loss.temperature != m.sample_temperature:
        raise ValueError(f"loss.temperature={cfg.loss.temperature} but the cache's samples were drawn at "
                         f"T={m.sample_temperature}: set loss.temperature={m.sample_temperature}")
    return ("sampled_idx", "sampled_cnt", "sampled_ent"), {}


def cached_batches(stream: CacheStream, x_all: np.ndarray, y_all: np.ndarray, lse_column: int = 0) -> Iterator[Batch]:
    """The rest of the stream's current epoch: cached teacher arrays joined with inputs and
    labels by id."""
    for batch in stream:
        ids = batch.pop("ids")
        if "lse" in batch:
            batch["lse"] = np.ascontiguousarray(batch["lse"][:, lse_column])
        yield torch.from_numpy(x_all[ids]), torch.from_numpy(y_all[ids]), batch


def student_identity(cfg: Config, spec: StudentConfig) -> dict:
    """Everything that defines a trained student: its architecture, the loss and its
    settings, the training settings (seed and device included: numerics differ; not
    ``resume``, which only says whether to continue)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k != "resume"}
    return {"student": asdict(spec), "loss": asdict(cfg.loss), "train": train}


def student_key(cfg: Config, spec: StudentConfig) -> str:
    return hash_json(student_identity(cfg, spec))[:12]


def student_settings(cfg: Config, spec: StudentConfig) -> dict:
    """The identity flattened to ``section.field: value`` (the leaderboard's columns)."""
    out = {}
    for section, values in student_identity(cfg, spec).items():
        for k, v in values.items():
            v = getattr(v, "value", v)
            out[f"{section}.{k}"] = [getattr(x, "value", x) for x in v] if isinstance(v, list) else v
    return out


def state_path(cfg: Config, root: str, reader: CacheReader, name: str, spec: StudentConfig) -> str | None:
    """Where a distilled student's training state lives between runs: keyed by the cache,
    the student, the loss and the training settings, so only the same run resumes it."""
    if not cfg.train.resume:
        return None
    cache = os.path.basename(reader.path.rstrip("/"))
    return os.path.join(root, "students", cache, f"{name}-{cfg.loss.distance.value}-{student_key(cfg, spec)}",
                        "state.pt")


def teacher_test_predictions(reader: CacheReader) -> np.ndarray:
    """The teacher's predicted class on the test split, exactly: the argmax of its float32
    logits, as the first top-k id or the ``top1`` array of a sampled-only cache hold it
    (stored float16/bfloat16 logits can tie after rounding: used only when nothing else is)."""
    start, stop = reader.split_range("test")
    a = reader.arrays
    if TOPK_IDX in a:
        return a[TOPK_IDX][start:stop, 0].compute().astype(np.int64)
    if TOP1 in a:
        return a[TOP1][start:stop].compute().astype(np.int64)
    return a[LOGITS][start:stop].compute().argmax(1)


def train_one(name: str, spec: StudentConfig, cfg: Config, splits: Splits, reader: CacheReader,
              run_dir: str, t_pred: np.ndarray, root: str) -> dict:
    """Distilled and labels-only runs of one student, with equal optimizer steps."""
    width, num_classes = splits["train"].x.shape[1], reader.num_classes
    x_all, y_all = splits.concat()
    arrays, how = teacher_arrays(reader, cfg)
    stream = CacheStream(reader, splits=TRAIN_SPLITS, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                         shuffle_window=cfg.train.shuffle_window, arrays=arrays)
    steps = cfg.train.epochs * len(stream)
    opt = {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}

    def loss_fn(logits, y, t):
        return distill_loss(logits, y, t, cfg.loss)

    device = choose_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    student = build_student(spec, width, num_classes).to(device)
    t0 = time.perf_counter()
    done = train_epochs(student, stream, lambda: cached_batches(stream, x_all, y_all, how.get("lse_column", 0)),
                        cfg.train.epochs, loss_fn, desc=f"{name}: distill",
                        state_path=state_path(cfg, root, reader, name, spec), **opt)
    if done != steps:
        raise RuntimeError(f"{name}: {done} optimizer steps instead of {steps}")
    distill_s = time.perf_counter() - t0

    torch.manual_seed(cfg.train.seed)
    baseline = build_student(spec, width, num_classes).to(device)  # same initial weights
    train_steps(baseline, label_batches(splits["train"].x, splits["train"].y, cfg.train.batch_size,
                                        cfg.train.seed), steps, ce_loss, desc=f"{name}: labels only", **opt)

    test = splits["test"]
    s_test, b_test = predict(student, test.x), predict(baseline, test.x)
    meta = {"student": name, "arch": spec.arch.value, "hidden": list(spec.hidden), "cache": reader.path}
    save_checkpoint(student, os.path.join(run_dir, "students", name, "distilled"), meta)
    save_checkpoint(baseline, os.path.join(run_dir, "students", name, "labels_only"), meta)
    return {
        "student": name,
        "key": f"{name}-{student_key(cfg, spec)}",  # the leaderboard's row: one per distinct student
        "settings": student_settings(cfg, spec),
        "arch": spec.arch.value,
        "loss": cfg.loss.distance.value,
        "test_acc": accuracy(s_test, test.y),
        "labels_only_acc": accuracy(b_test, test.y),
        "teacher_acc": float((t_pred == test.y).mean()),
        "agreement": float((s_test.argmax(1) == t_pred).mean()),
        "labels_only_agreement": float((b_test.argmax(1) == t_pred).mean()),
        "params": count_params(student),
        "steps": steps,
        "train_rows": stream.rows,
        "seconds": round(distill_s, 2),
    }


def format_results(rows: list[dict]) -> str:
    lines = [f"teacher test accuracy: {rows[0]['teacher_acc']:.4f}" if rows else "no students",
             "| student | loss | distilled acc | labels-only acc | gain | agreement w/ teacher | params | distill time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['loss']} | {r['test_acc']:.4f} | {r['labels_only_acc']:.4f} | "
                     f"{100 * (r['test_acc'] - r['labels_only_acc']):+.1f} pt | {r['agreement']:.4f} | "
                     f"{r['params']:,} | {r['seconds']:.1f}s |")
    return "\n".join(lines)
