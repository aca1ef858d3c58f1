"""Stage 1 for task=lm: the whole token capture (forward, real-token selection, top-K +
logsumexp and sampling over the vocabulary, host copies, background writes) over the bare
teacher forward passes on the same sequences, same batches, measured alternately.

    .venv/bin/python bench/lm_capture.py [hydra overrides, e.g. data.train_size=64 cache.modes=[topk]]

The last line is one JSON object with overhead_ratio and tokens_per_s.
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

from pipeline.config import register
from pipeline.device import choose_device
from pipeline.tasks import validate
from pipeline.tasks.lm import LanguageModel, teacher_logits
from pipeline.tasks.lm.models import load_teacher
from pipeline.tasks.lm.text import load_tokens


@torch.inference_mode()
def bare_forward(model, data, batch_size: int, device) -> None:
    n = len(data.offsets) - 1
    for b in range(0, n, batch_size):
        teacher_logits(model, [data.sequence(i) for i in range(b, min(b + batch_size, n))], 0, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(overrides: list[str], repeats: int = 2) -> dict:
    register()
    tmp = tempfile.mkdtemp(prefix="bench-lm-")
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=[
            "task=lm", "data.train_size=48", "data.test_size=8", f"paths.root={tmp}", *overrides])))
    try:
        teacher = load_teacher(cfg.teacher)
        device = choose_device(cfg.teacher.device)
        model = teacher.model.to(device)
        data = load_tokens(cfg.data, tmp, teacher.tokenizer)
        bare, full = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            bare_forward(model, data, cfg.teacher.batch_size, device)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            LanguageModel(cfg).capture(teacher, data, f"{tmp}/cache-{r}")
            full.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = int(data.offsets[-1])
    res = {"tokens": tokens, "modes": sorted(m.value for m in cfg.cache.modes), "k": cfg.cache.k,
           "samples": cfg.cache.samples, "precision": cfg.teacher.precision.value, "device": str(device),
           "bare_forward_s": min(bare), "stage1_s": min(full), "overhead_ratio": min(full) / min(bare),
           "tokens_per_s": tokens / min(full)}
    print(f"bare forward {min(bare):.2f}s  stage 1 {min(full):.2f}s  overhead x{res['overhead_ratio']:.3f} "
          f"({res['tokens_per_s']:.0f} tokens/s)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
