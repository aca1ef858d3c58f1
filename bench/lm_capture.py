"""Stage 1 for task=lm: the whole token capture (forward, real-token selection, top-K +
logsumexp and sampling over the vocabulary, host copies, background writes) over the bare
teacher forward passes on the same sequences, same packed batches, the same rows kept,
measured alternately.

    .venv/bin/python bench/lm_capture.py [--repeats N] [hydra overrides, e.g. data.train_size=64 cache.modes=[topk]]

Each repeat runs the bare forward, then stage 1 (then, on CPU, stage 1 with the torch
composition); the ratio is of the fastest of each over the repeats (default 3: the teacher
forward alone varies by up to 10% from one pass to the next on a shared 2-core machine), and
each repeat's own ratio is printed too. The last line is one JSON object with
overhead_ratio and tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import pipeline.capture
from pipeline.cache import ShardRecord
from pipeline.config import register
from pipeline.device import choose_device
from pipeline.representations import represent, represent_torch
from pipeline.tasks import validate
from pipeline.tasks.lm import LanguageModel, TokenRows
from pipeline.tasks.lm.models import load_teacher
from pipeline.tasks.lm.text import load_tokens


@torch.inference_mode()
def bare_forward(model, data, batch_size: int, pad_id: int, device) -> None:
    """The teacher's forward passes as stage 1 runs them (the same packed batches, the same
    rows kept), and nothing else."""
    rows = TokenRows(model, data, batch_size, pad_id, device)
    for _ in rows.logits(ShardRecord(0, 0, int(data.offsets[-1]))):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(overrides: list[str], repeats: int = 3) -> dict:
    register()
    tmp = tempfile.mkdtemp(prefix="bench-lm-")
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=[
            "task=lm", "data.train_size=48", "data.test_size=8", f"paths.root={tmp}", *overrides])))
    try:
        teacher = load_teacher(cfg.teacher, cfg.paths.conversions)
        task = LanguageModel(cfg)
        _ = task.tokenizer  # loaded once: a fixed cost per run, not per token
        device = choose_device(cfg.teacher.device)
        model = teacher.model.to(device)
        data = load_tokens(cfg.data, tmp, teacher.tokenizer)
        bare, full, composed = [], [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            bare_forward(model, data, cfg.teacher.batch_size, teacher.pad_id, device)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            task.capture(teacher, data, f"{tmp}/cache-{r}")
            full.append(time.perf_counter() - t0)
            if device.type == "cpu":  # the torch composition the fused row pass replaced, for comparison
                pipeline.capture.represent = represent_torch
                t0 = time.perf_counter()
                task.capture(teacher, data, f"{tmp}/torch-{r}")
                composed.append(time.perf_counter() - t0)
                pipeline.capture.represent = represent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = int(data.offsets[-1])
    res = {"tokens": tokens, "modes": sorted(m.value for m in cfg.cache.modes), "k": cfg.cache.k,
           "samples": cfg.cache.samples, "precision": cfg.teacher.precision.value, "device": str(device),
           "bare_forward_s": min(bare), "stage1_s": min(full), "overhead_ratio": min(full) / min(bare),
           "tokens_per_s": tokens / min(full),
           "torch_composition_ratio": min(composed) / min(bare) if composed else None,
           "paired_ratios": [f / b for f, b in zip(full, bare, strict=True)]}
    print(f"bare forward {min(bare):.2f}s  stage 1 {min(full):.2f}s  overhead x{res['overhead_ratio']:.3f} "
          f"({res['tokens_per_s']:.0f} tokens/s)"
          + (f"; with the torch composition instead of the fused row pass x{res['torch_composition_ratio']:.3f}"
             if composed else ""))
    each = "  ".join(f"{f:.2f}/{b:.2f}s x{r:.3f}" for f, b, r in zip(full, bare, res["paired_ratios"], strict=True))
    print("each repeat: " + each)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args, overrides = ap.parse_known_args()
    main(overrides, args.repeats)
