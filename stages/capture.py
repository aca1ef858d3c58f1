"""Stage 1: run the teacher once over the dataset and cache its outputs."""

from __future__ import annotations

import gc
import logging

import torch

from pipeline.cache.storage import check_writable
from pipeline.config import Config
from pipeline.processes import Processes
from pipeline.tasks import task_for

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str, processes: Processes | None = None) -> str:
    task = task_for(cfg, processes)
    check_writable(task.root, "paths.root")  # now, not after the teacher is fitted or loaded
    check_writable(cfg.cache.path or task.root, "cache.path")
    data = task.load_data()
    teacher = task.load_teacher(data)
    url = task.cache_url(data)
    task.capture(teacher, data, url)
    task.after_capture(teacher, data, url)
    del teacher  # stages 2 and 3 never need it: free it before anything else runs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("stage 1 done: cache %s", url)
    return url
