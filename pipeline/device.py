"""Device choice with a CPU fallback, and the matching autocast context."""

from __future__ import annotations

import contextlib
import logging

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. An explicit device that is not
    there is an error, never a silent fallback."""
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device=auto -> %s", device)
        return device
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ConfigError(f"device={requested!r} is not a torch device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested!r} but CUDA is not available here; use device=auto or device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={requested!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"device={requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, precision: str):
    """Autocast for ``bf16``/``fp16``; a no-op context for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ConfigError(f"precision={precision!r}: expected one of fp32, bf16, fp16")
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("precision=fp16 is not supported on CPU; use fp32 or bf16")
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
