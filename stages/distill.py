"""Stage 3: train the configured students against the cache; write ``results.json``,
student checkpoints and a results table. Never loads the teacher."""

from __future__ import annotations

import json
import logging
import os

from pipeline.cache import open_for_run
from pipeline.config import Config, Task, resolve_root
from pipeline.datasets import load_splits
from pipeline.distill import format_results, teacher_test_predictions, train_one
from pipeline.leaderboard import update_leaderboard

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str) -> list[dict]:
    root = resolve_root(cfg)
    if cfg.task is Task.lm:
        return lm_main(cfg, root, run_dir)
    splits = load_splits(cfg.data, root)
    reader = open_for_run(cfg, root, splits.content_hash())
    t_pred = teacher_test_predictions(reader)
    rows = [train_one(name, spec, cfg, splits, reader, run_dir, t_pred, root) for name, spec in cfg.student.items()]
    os.makedirs(run_dir, exist_ok=True)
    results = {"cache": reader.path, "loss": {k: getattr(v, "value", v) for k, v in vars(cfg.loss).items()}, "students": rows}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n" + format_results(rows), flush=True)
    board_dir = os.path.join(root, "leaderboards", os.path.basename(reader.path.rstrip("/")))
    update_leaderboard(board_dir, rows)
    log.info("results: %s", os.path.join(run_dir, "results.json"))
    return rows


def lm_main(cfg: Config, root: str, run_dir: str) -> list[dict]:
    from pipeline.device import choose_device
    from pipeline.lm_distill import format_lm_results, train_variant, variants, write_lm_results
    from pipeline.token_capture import open_token_cache

    reader, data = open_token_cache(cfg, root)
    device = choose_device(cfg.train.device)
    rows = [train_variant(name, spec, v, cfg, reader, data, device, save_dir=os.path.join(run_dir, "students"))
            for name, spec in cfg.student.items() for v in variants(cfg)]
    results = write_lm_results(run_dir, reader, rows)
    print("\n" + format_lm_results(rows, results["teacher"], results["full_fp16_bytes_per_token"]), flush=True)
    log.info("results: %s", os.path.join(run_dir, "results.json"))
    return rows
