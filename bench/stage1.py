"""Stage 1's overhead: the whole capture (forward passes, representations, host copies,
background encoding and writes, manifest) over the bare teacher forward passes on the
same rows, same batch size, same device, measured alternately in one run.

    .venv/bin/python bench/stage1.py [hydra overrides, e.g. cache.modes=[full,topk] cache=arrow]

Uses the real config (default: the built-in MNIST-1D data and CNN teacher under
paths.root, fitted first if needed). The last line is one JSON object with overhead_ratio.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pipeline.config import register, resolve_root
from pipeline.device import autocast, choose_device
from pipeline.tasks import validate
from pipeline.tasks.classify import Classify, obtain_teacher
from pipeline.tasks.classify.data import load_splits


@torch.inference_mode()
def bare_forward(teacher, x, batch_size: int, device, precision: str) -> None:
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size]).to(device, non_blocking=True)
        with autocast(device, precision):
            teacher(xb).float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(overrides: list[str], repeats: int = 3) -> dict:
    register()
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=overrides)))
    root = resolve_root(cfg)
    splits = load_splits(cfg.data, root)
    teacher, _ = obtain_teacher(cfg, splits, root)
    device = choose_device(cfg.teacher.device)
    teacher = teacher.to(device).eval()
    x, _ = splits.concat()
    precision = Classify(cfg).teacher_precision(splits)  # auto: as stage 1 resolves it
    tmp = tempfile.mkdtemp(prefix="bench-stage1-")
    bare, full = [], []
    try:
        bare_forward(teacher, x[:cfg.teacher.batch_size], cfg.teacher.batch_size, device, precision)
        for r in range(repeats):
            t0 = time.perf_counter()
            bare_forward(teacher, x, cfg.teacher.batch_size, device, precision)
            bare.append(time.perf_counter() - t0)
            cache = f"{tmp}/cache-{r}"
            t0 = time.perf_counter()
            Classify(cfg).capture(teacher, splits, cache)
            full.append(time.perf_counter() - t0)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"rows": len(x), "classes": splits.num_classes, "modes": sorted(m.value for m in cfg.cache.modes),
           "format": cfg.cache.format.value, "device": str(device), "precision": precision, "bare_forward_s": min(bare),
           "stage1_s": min(full), "overhead_ratio": min(full) / min(bare)}
    print(f"bare forward {min(bare):.3f}s  stage 1 {min(full):.3f}s  overhead x{res['overhead_ratio']:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
