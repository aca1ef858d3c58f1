"""The classifier zoo (the built-in CNN teacher; linear, MLP and CNN students), user modules
by import path, safetensors checkpoints."""

from __future__ import annotations

import importlib
import json
import logging
import os

import torch
from safetensors.torch import load_file, save
from torch import nn

from pipeline.cache.storage import write_file_atomic
from pipeline.config import ClassifyStudentConfig, ClassifyTeacherConfig
from pipeline.errors import ConfigError, DataNotFound

log = logging.getLogger(__name__)


class CNN1d(nn.Module):
    """Small 1-D CNN over a (B, L) signal: the built-in teacher, and the ``cnn`` student."""

    def __init__(self, length: int, num_classes: int, channels: int = 64, hidden: int = 0):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        )
        flat = c * ((((length - 1) // 2) // 2) + 1)
        head = [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)] if hidden \
            else [nn.Flatten(), nn.Linear(flat, num_classes)]
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))  # (B, L) -> (B, 1, L) -> (B, C)


def mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _import(target: str, what: str):
    module_name, _, cls_name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{what}._target_={target!r} could not be imported: {e}") from e


def build_student(spec: ClassifyStudentConfig, in_features: int, num_classes: int) -> nn.Module:
    """A zoo student, or any torch module named by ``_target_``; its output must be
    (batch, num_classes) for (batch, in_features) inputs."""
    if spec._target_:
        model = _import(spec._target_, "student")(**dict(spec.kwargs))
        with torch.no_grad():
            out = model(torch.zeros(2, in_features))
        if tuple(out.shape) != (2, num_classes):
            raise ConfigError(f"student {spec._target_} maps (batch, {in_features}) inputs to {tuple(out.shape[1:])}; "
                             f"the cache holds {num_classes} classes: make its output width {num_classes}")
        return model
    arch = spec.arch.value
    if arch == "linear":
        return nn.Linear(in_features, num_classes)
    if arch == "mlp":
        return mlp(in_features, list(spec.hidden), num_classes)
    return CNN1d(in_features, num_classes, spec.channels, spec.hidden[0] if spec.hidden else 0)


def build_teacher(cfg: ClassifyTeacherConfig, in_features: int, num_classes: int) -> nn.Module:
    if cfg._target_ is None:
        return CNN1d(in_features, num_classes, cfg.channels)
    return _import(cfg._target_, "teacher")(**dict(cfg.kwargs))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: nn.Module, directory: str, meta: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` atomically (temp name, rename)."""
    write_file_atomic(os.path.join(directory, "config.json"), json.dumps(meta, indent=2, default=str).encode())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # last: its presence means the checkpoint is whole
    write_file_atomic(os.path.join(directory, "model.safetensors"), save(state))


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a ``.safetensors`` file (or a folder holding ``model.safetensors``), or a
    torch ``state_dict`` file, strictly: a missing or unexpected key is an error."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise DataNotFound(f"teacher checkpoint {path!r} does not exist")
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path!r} does not match the configured model: {e}") from e
    return model
