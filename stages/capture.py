"""Stage 1: run the teacher once over the dataset and cache its logits."""

from __future__ import annotations

import gc
import logging

import torch

from pipeline.cache import cache_location
from pipeline.cache.storage import check_writable
from pipeline.capture import capture_logits
from pipeline.config import Config, Task, resolve_root, resolve_workers
from pipeline.datasets import load_splits
from pipeline.teacher import obtain_teacher

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str) -> str:
    root = resolve_root(cfg)
    check_writable(root, "paths.root")  # now, not after the teacher is fitted or loaded
    check_writable(cfg.cache.path or root, "cache.path")
    if cfg.task is Task.lm:
        return lm_main(cfg, root)
    splits = load_splits(cfg.data, root)
    teacher, checkpoint = obtain_teacher(cfg, splits, root)
    cache_dir = cache_location(cfg, root)
    capture_logits(teacher, splits, cfg, cache_dir)
    del teacher  # stages 2 and 3 never need it: free it before anything else runs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("stage 1 done: teacher %s -> cache %s", checkpoint, cache_dir)
    return cache_dir


def lm_main(cfg: Config, root: str) -> str:
    from pipeline.causal_lm import load_teacher
    from pipeline.text import load_tokens
    from pipeline.token_capture import capture_tokens, evaluate_teacher, lm_cache_location

    teacher = load_teacher(cfg.teacher)
    data = load_tokens(cfg.data, root, teacher.tokenizer)
    cache_dir = lm_cache_location(cfg, root, data)
    capture_tokens(teacher, data, cfg, cache_dir)
    rank, _ = resolve_workers(cfg)
    if rank == 0:
        evaluate_teacher(teacher, data, cfg, cache_dir)
    del teacher
    gc.collect()
    log.info("stage 1 done: cache %s", cache_dir)
    return cache_dir
