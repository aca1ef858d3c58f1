"""Getting a teacher: load a user's checkpoint, or fit the built-in one once and keep it."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import torch

from pipeline.cache.fingerprint import hash_json
from pipeline.config import Config
from pipeline.datasets import Splits
from pipeline.models import build_teacher, count_params, load_weights, save_checkpoint
from pipeline.training import accuracy, fit_classifier, predict

log = logging.getLogger(__name__)


def default_checkpoint_dir(cfg: Config, root: str) -> str:
    ident = {"data": asdict(cfg.data), "fit": asdict(cfg.teacher.fit), "channels": cfg.teacher.channels}
    key = hash_json(ident)[:12]
    return os.path.join(root, "teachers", f"{cfg.teacher.name}-{cfg.data.name}-{key}")


def obtain_teacher(cfg: Config, splits: Splits, root: str) -> tuple[torch.nn.Module, str]:
    """Return the teacher (on CPU, eval mode) and the checkpoint it came from."""
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
