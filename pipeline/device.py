"""Device choice with a CPU fallback, the precision a model runs in (``auto``: measured on
this machine), and the matching autocast context."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time

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


PRECISION_MEMO = "precision.json"  # what precision=auto measured, per machine (under paths.conversions)
PROBE_ROWS = 32
PROBE_VERSION = 2  # 2: linear layers' (out, in) weights, as models hold them (1 timed (in, out) matmuls)
BF16_MARGIN = 1.2  # precision=auto picks bf16 only where its matmuls run this much faster than fp32's  # rows of each probe matmul: a short batch, as a decoding or small-batch forward has
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device, shapes: list[tuple[int, int]],
                      memo: str | None = None) -> str:
    """The precision a model runs in: ``requested`` unless it is ``auto``. ``auto`` on CUDA
    is bf16 where the device supports it, else fp32. On CPU it is measured: bf16 where its
    matmuls of the model's own ``shapes`` ((in, out) features) run :data:`BF16_MARGIN` times
    as fast as fp32's (a near tie is fp32, which rounds less, so the processes of one job
    agree), else fp32; kept in the JSON file ``memo`` per processor, torch version, thread
    count and shapes, so each machine measures once. (A processor that reports AVX-512 BF16 can still run bfloat16 matmuls
    slower than float32: the flag is not the answer, the clock is.)"""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        log.info("precision=auto -> %s (%s)", chosen, torch.cuda.get_device_name(device))
        return chosen
    key = json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "shapes": [list(s) for s in shapes], "probe": PROBE_VERSION}, sort_keys=True)
    known = _read_memo(memo)
    if key in known:
        chosen = known[key]["precision"]
        log.info("precision=auto -> %s (measured earlier on this machine, %s)", chosen, memo)
        return chosen
    flops = 2 * PROBE_ROWS * sum(k * n for k, n in shapes)
    fp32 = matmul_seconds("fp32", shapes)
    rates = {"fp32": flops / fp32 / 1e9, "bf16": flops / matmul_seconds("bf16", shapes, limit=2 * fp32) / 1e9}
    # bf16 rounds: it must be clearly faster (a near tie goes to fp32, the same way on every run)
    chosen = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
    log.info("precision=auto -> %s: matmuls of the model's shapes run at %s on %s", chosen,
             ", ".join(f"{p} {r:.1f} GFLOP/s" for p, r in rates.items()), cpu_name())
    if memo:
        _write_memo(memo, known | {key: {"precision": chosen, "gflops": rates}})
    return chosen


def matmul_seconds(precision: str, shapes: list[tuple[int, int]], rows: int = PROBE_ROWS, reps: int = 3,
                   limit: float = float("inf")) -> float:
    """The fastest of ``reps`` passes over one linear layer per shape ((rows, in) inputs,
    (out, in) weights: the layout and kernel a model's ``nn.Linear`` uses), in ``precision``,
    after a warm-up on the first shape; one pass slower than ``limit`` seconds ends the
    measurement (it has lost already)."""
    g = torch.Generator().manual_seed(0)
    dtype = _DTYPES[precision]
    pairs = [(torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)) for k, n in shapes]
    torch.nn.functional.linear(pairs[0][0][:1], pairs[0][1])  # warm-up: the kernels' first-call set-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a, w in pairs:
            torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
        if best > limit:
            break
    return best


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what Python reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a measurement ran on: the processor, its vector extensions (as torch uses them
    and as the CPU reports the ones that matter for bfloat16), threads, and the GPU if any."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    out = {"cpu": cpu_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _read_memo(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        log.warning("ignoring %s: not a readable JSON file of precision measurements", path)
        return {}


def _write_memo(path: str, data: dict) -> None:
    from pipeline.cache.storage import write_file_atomic

    try:
        write_file_atomic(path, json.dumps(data, indent=2).encode())
    except OSError as e:  # a read-only home: measured again next time
        log.warning("could not keep the precision measurement in %s (%s)", path, e)
