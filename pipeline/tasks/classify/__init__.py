"""The classifier task: one label per sample (MNIST-1D, or any dataset on disk), a
teacher's class logits per sample, students trained twice (distilled from the cache, and
on the labels alone as their baseline) and compared on the test split.

The teacher is never imported or built in stage 3: its test predictions come from the cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import CacheReader, cache_key, fingerprint_fields, make_fingerprint
from pipeline.cache.fingerprint import layout_settings
from pipeline.cache.format import LOGITS, TOP1, TOPK_IDX
from pipeline.capture import plan_manifest
from pipeline.config import DataSource, StudentArch
from pipeline.device import autocast
from pipeline.errors import ConfigError
from pipeline.hashing import hash_json, hash_state_dict, plain
from pipeline.leaderboard import update_leaderboard
from pipeline.losses import distill_loss, select_teacher, teacher_arrays
from pipeline.stream import CacheRows, CacheStream, Resumable
from pipeline.students import Fit, StudentRun, student_identity
from pipeline.tasks.base import Task
from pipeline.tasks.classify.data import Splits, load_splits
from pipeline.tasks.classify.models import (
    build_student,
    build_teacher,
    count_params,
    load_weights,
    save_checkpoint,
)
from pipeline.training import train

log = logging.getLogger(__name__)

TEACHER_ARCHS = ("cnn",)
TRAIN_SPLITS = ("transfer", "train")


class SampleRows:
    """The capture engine's rows for a classifier: the teacher over batches of samples."""

    unit = "row"

    def __init__(self, teacher: torch.nn.Module, x: np.ndarray, batch_size: int, precision: str,
                 device: torch.device):
        self.teacher, self.x, self.batch_size, self.precision, self.device = teacher, x, batch_size, precision, device

    def logits(self, shard):
        x = self.x[shard.start:shard.stop]
        for i in range(0, shard.rows, self.batch_size):
            xb = torch.from_numpy(x[i:i + self.batch_size]).to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                yield i, self.teacher(xb).float()  # (B, C)

    def ids(self, shard) -> np.ndarray:
        return np.arange(shard.start, shard.stop, dtype=np.int64)  # a row's id is its sample's


class LabelStream(Resumable):
    """Shuffled mini-batches ``(x, y, None)`` of labeled samples, epoch by epoch, the last
    partial batch dropped: the data of the built-in teacher's fit and of the label-only
    baselines. Epoch e's order is the (e+1)-th permutation drawn from ``default_rng(seed)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._rng, self._drawn = np.random.default_rng(seed), 0

    def __len__(self) -> int:
        return max(len(self.y) // self.batch_size, 1)

    def _order(self) -> torch.Tensor:
        if self._drawn > self.epoch:  # resumed to an earlier epoch: draw again from the start
            self._rng, self._drawn = np.random.default_rng(self.seed), 0
        while self._drawn <= self.epoch:
            order, self._drawn = self._rng.permutation(len(self.y)), self._drawn + 1
        return torch.from_numpy(order)

    def __iter__(self):
        order, bs = self._order(), self.batch_size
        for i in range(self.position * bs, len(order) - bs + 1 if len(order) >= bs else 1, bs):
            idx = order[i:i + bs]
            self.position += 1
            yield self.x[idx], self.y[idx], None
        self.epoch, self.position = self.epoch + 1, 0


def ce_loss(model, batch) -> torch.Tensor:
    x, y, _ = batch
    device = next(model.parameters()).device
    return F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))


def fit_classifier(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                   lr: float, weight_decay: float, seed: int, desc: str) -> float:
    """Fit on labels alone for ``epochs`` passes; deterministic for ``seed``."""
    torch.manual_seed(seed)
    stream = LabelStream(x, y, batch_size, seed)
    return train(model, stream, epochs * len(stream), ce_loss, lr=lr, weight_decay=weight_decay, desc=desc)[1]


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def default_checkpoint_dir(cfg, root: str) -> str:
    ident = {"data": asdict(cfg.data), "fit": asdict(cfg.teacher.fit), "channels": cfg.teacher.channels}
    return os.path.join(root, "teachers", f"{cfg.teacher.name}-{cfg.data.name}-{hash_json(ident)[:12]}")


def obtain_teacher(cfg, splits: Splits, root: str) -> tuple[torch.nn.Module, str]:
    """The teacher (on CPU, eval mode) and the checkpoint it came from: the user's, or the
    built-in CNN, fitted once on the labeled train split and kept."""
    width = splits["train"].x.shape[1]
    model = build_teacher(cfg.teacher, width, splits.num_classes)
    if cfg.teacher.checkpoint:
        load_weights(model, cfg.teacher.checkpoint)
        log.info("teacher loaded from %s (%d parameters)", cfg.teacher.checkpoint, count_params(model))
        return model.eval(), cfg.teacher.checkpoint
    ckpt = default_checkpoint_dir(cfg, root)
    if os.path.exists(os.path.join(ckpt, "model.safetensors")):
        load_weights(model, ckpt)
        log.info("teacher loaded from %s (fitted earlier)", ckpt)
        return model.eval(), ckpt
    fit = cfg.teacher.fit
    torch.manual_seed(fit.seed)
    model = build_teacher(cfg.teacher, width, splits.num_classes)  # re-init under the fit seed
    log.info("no teacher checkpoint: fitting the built-in %s teacher (%d parameters) on %d labeled rows",
             cfg.teacher.name, count_params(model), len(splits["train"].y))
    fit_classifier(model, splits["train"].x, splits["train"].y, epochs=fit.epochs, batch_size=fit.batch_size,
                   lr=fit.lr, weight_decay=fit.weight_decay, seed=fit.seed, desc="fit teacher")
    acc = accuracy(predict(model, splits["test"].x), splits["test"].y)
    log.info("teacher test accuracy: %.4f", acc)
    save_checkpoint(model, ckpt, {"teacher": asdict(cfg.teacher), "test_acc": acc, "params": count_params(model)})
    return model.eval(), ckpt


def teacher_test_predictions(reader: CacheReader) -> np.ndarray:
    """The teacher's predicted class on the test split, exactly: the argmax of its float32
    logits, as the first top-k id or the ``top1`` array of a sampled-only cache hold it
    (stored float16/bfloat16 logits can tie after rounding: used only when nothing else is)."""
    start, stop = reader.split_range("test")
    name = next(n for n in (TOPK_IDX, TOP1, LOGITS) if n in reader.arrays)
    rows = CacheRows(reader, (name,)).read_rows(start, stop)[name]
    if name == TOPK_IDX:
        return rows[:, 0].astype(np.int64)
    return rows.astype(np.int64) if name == TOP1 else rows.argmax(1)


class Classify(Task):
    name = "classify"

    @staticmethod
    def validate(cfg, p: list[str]) -> None:
        if cfg.data.source is DataSource.shakespeare:
            p.append("data=shakespeare is text for task=lm; a classifier reads data=mnist1d or data=disk")
        if cfg.teacher._target_ is None and cfg.teacher.name not in TEACHER_ARCHS:
            p.append(f"teacher.name={cfg.teacher.name!r}: the built-in teachers are {list(TEACHER_ARCHS)}; "
                     "for your own module set teacher._target_=<import.path.Class> and teacher.checkpoint")
        if cfg.teacher._target_ is not None and not cfg.teacher.checkpoint:
            p.append("teacher._target_ is set but teacher.checkpoint is not: a user teacher needs its weights")
        for name in ("batch_size", "channels"):
            if getattr(cfg.teacher, name) <= 0:
                p.append(f"teacher.{name}={getattr(cfg.teacher, name)}: must be > 0")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(cfg.teacher.fit, name) <= 0:
                p.append(f"teacher.fit.{name}={getattr(cfg.teacher.fit, name)}: must be > 0")
        for name in ("train_size", "test_size", "num_classes"):
            if getattr(cfg.data, name) <= 0:
                p.append(f"data.{name}={getattr(cfg.data, name)}: must be > 0")
        if cfg.data.transfer_size < 0:
            p.append(f"data.transfer_size={cfg.data.transfer_size}: must be >= 0")
        for key, s in cfg.student.items():
            if any(h <= 0 for h in s.hidden):
                p.append(f"student.{key}.hidden={s.hidden}: widths must be > 0")
        bad = [k for k, s in cfg.student.items() if s.arch is StudentArch.causal_lm]
        if bad:
            p.append(f"students {bad} are causal LMs: task=classify trains linear, mlp, cnn or a _target_ module")
        if "topk" in [m.value for m in cfg.cache.modes] and cfg.cache.k > cfg.data.num_classes:
            p.append(f"cache.k={cfg.cache.k} is larger than data.num_classes={cfg.data.num_classes}")

    # -- data, teacher, cache -----------------------------------------------------------------
    def load_data(self) -> Splits:
        return load_splits(self.cfg.data, self.root)

    def teacher_identity(self) -> dict:
        """Teacher settings that change its logits (not device or batch size)."""
        t = asdict(self.cfg.teacher)
        return {k: t[k] for k in ("name", "_target_", "kwargs", "checkpoint", "channels", "fit")}

    def cache_key(self, splits: Splits) -> str:
        ident = {"teacher": self.teacher_identity(), "data": asdict(self.cfg.data),
                 "capture": self.capture_settings(self.cfg.teacher.precision.value),
                 "layout": layout_settings(self.cfg.cache)}
        return cache_key(self.cfg.data.name, self.cfg.teacher.name, ident)

    def expected_fields(self, splits: Splits) -> dict:
        return fingerprint_fields(dataset=splits.content_hash(), teacher=self.teacher_identity(),
                                  capture=self.capture_settings(self.teacher_precision(splits)))

    def matmul_shapes(self, splits: Splits) -> list[tuple[int, int]]:
        """The built-in CNN's convolutions as the matmuls they are (kernel x channels in ->
        channels out) and its head; a user's module, a square matmul of its batch's width."""
        if self.cfg.teacher._target_ is not None:
            return [(512, 512)]
        c, width = self.cfg.teacher.channels, splits["train"].x.shape[1]
        return [(5, c), (3 * c, c), (3 * c, c), (c * ((((width - 1) // 2) // 2) + 1), splits.num_classes)]

    def open_cache(self, splits: Splits, num_classes: int | None = None) -> CacheReader:
        return super().open_cache(splits, num_classes=self.cfg.data.num_classes)

    def load_teacher(self, splits: Splits) -> torch.nn.Module:
        teacher, checkpoint = obtain_teacher(self.cfg, splits, self.root)
        log.info("teacher: %s", checkpoint)
        return teacher

    def plan(self, teacher, splits: Splits):
        fields = self.expected_fields(splits) | {"teacher_weights": hash_state_dict(teacher)}
        rows = sum(len(s.y) for s in splits.splits.values())
        return plan_manifest(self.cfg.cache, rows=rows, num_classes=splits.num_classes, splits=splits.ranges(),
                             fingerprint=make_fingerprint(fields)), None

    def rows(self, teacher, splits: Splits, device) -> SampleRows:
        return SampleRows(teacher.to(device).eval(), splits.concat()[0], self.cfg.teacher.batch_size,
                          self.teacher_precision(splits), device)

    def row_labels(self, splits: Splits, reader: CacheReader) -> np.ndarray:
        return splits.concat()[1]  # a classifier cache's row r holds sample r

    # -- students -------------------------------------------------------------------------------
    def student_runs(self, splits: Splits, reader: CacheReader, device) -> Iterator[StudentRun]:
        """Each student twice from the same initial weights, for the same steps: distilled
        from the cache, and on the labels alone (its baseline); compared on the test split."""
        if self.processes.torchrun:
            raise ConfigError("multi-process student training (torchrun) is built for task=lm; train classifier "
                             "students in one process (they take minutes), or one sweep job per process (-m)")
        cfg = self.cfg
        t_pred = teacher_test_predictions(reader)
        x_all, y_all = splits.concat()  # once: every student joins the cache's ids to these
        width, num_classes = splits["train"].x.shape[1], reader.num_classes
        arrays, lse_column = teacher_arrays(reader.manifest, cfg.loss)
        test = splits["test"]

        def loss_fn(model, batch):
            x, y, t = batch
            t = select_teacher(t, lse_column, cfg.loss.k)
            if device.type != "cpu":  # CPU kernels read the NumPy arrays directly
                t = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in t.items()}
            logits = model(x.to(device, non_blocking=True)).float()  # (B, C); a no-op unless under bf16 autocast
            return distill_loss(logits, y.to(device, non_blocking=True), t, cfg.loss)

        def evaluate(models: dict) -> dict:
            s_test, b_test = predict(models["distilled"], test.x), predict(models["labels_only"], test.x)
            return {"test_acc": accuracy(s_test, test.y), "labels_only_acc": accuracy(b_test, test.y),
                    "teacher_acc": float((t_pred == test.y).mean()),
                    "agreement": float((s_test.argmax(1) == t_pred).mean()),
                    "labels_only_agreement": float((b_test.argmax(1) == t_pred).mean())}

        for name, spec in cfg.student.items():
            stream = CacheStream(reader, splits=TRAIN_SPLITS, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                 shuffle_window=cfg.train.shuffle_window, arrays=arrays)

            def batches(stream=stream):  # the rest of the stream's epoch, joined with inputs and labels by id
                for batch in stream:
                    ids = batch.pop("ids")
                    yield torch.from_numpy(x_all[ids]), torch.from_numpy(y_all[ids]), batch

            models = []
            for _ in range(2):  # the student and its baseline: the same initial weights
                torch.manual_seed(cfg.train.seed)
                models.append(build_student(spec, width, num_classes).to(device))
            labels = LabelStream(splits["train"].x, splits["train"].y, cfg.train.batch_size, cfg.train.seed)
            meta = {"student": name, "arch": spec.arch.value, "hidden": list(spec.hidden), "cache": reader.path}
            yield StudentRun(
                name=name, label=cfg.loss.distance.value, identity=student_identity(spec, cfg.loss, cfg.train),
                fits=[Fit("distilled", models[0], stream, loss_fn, batches),
                      Fit("labels_only", models[1], labels, ce_loss, resumable=False)],
                evaluate=evaluate, save=lambda model, folder, meta=meta: save_checkpoint(model, folder, meta),
                row={"arch": spec.arch.value, "loss": cfg.loss.distance.value, "train_rows": stream.rows})

    def results(self, rows: list[dict], reader: CacheReader) -> tuple[dict, str]:
        loss = {k: plain(v) for k, v in vars(self.cfg.loss).items()}
        return {"loss": loss}, format_results(rows)

    def publish(self, rows: list[dict], reader: CacheReader) -> None:
        update_leaderboard(os.path.join(self.root, "leaderboards", os.path.basename(reader.path.rstrip("/"))), rows)


def format_results(rows: list[dict]) -> str:
    lines = [f"teacher test accuracy: {rows[0]['teacher_acc']:.4f}" if rows else "no students",
             "| student | loss | distilled acc | labels-only acc | gain | agreement w/ teacher | params | distill time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['loss']} | {r['test_acc']:.4f} | {r['labels_only_acc']:.4f} | "
                     f"{100 * (r['test_acc'] - r['labels_only_acc']):+.1f} pt | {r['agreement']:.4f} | "
                     f"{r['params']:,} | {r['train_s']:.1f}s |")
    return "\n".join(lines)


__all__ = ["Classify", "LabelStream", "SampleRows", "accuracy", "obtain_teacher", "predict",
           "teacher_test_predictions"]
