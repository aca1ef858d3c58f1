"""Stage 2: open the cache lazily with Dask, check it, audit it, write ``audit.json``."""

from __future__ import annotations

import json
import logging
import os

from pipeline.audit import audit_cache, format_audit, plot_audit
from pipeline.cache import open_for_run
from pipeline.cluster import scheduler
from pipeline.config import Config, Task, resolve_root
from pipeline.datasets import load_splits
from pipeline.derive import derive_for_run

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str) -> dict:
    root = resolve_root(cfg)
    if cfg.task is Task.lm:
        return lm_main(cfg, root, run_dir)
    splits = load_splits(cfg.data, root)
    reader = open_for_run(cfg, root, splits.content_hash())
    if cfg.verify:
        reader.verify()
        log.info("verified %d shard checksums", len(reader.manifest.shards))
    _, labels = splits.concat()
    with scheduler(cfg.dask.scheduler, cfg.dask.workers) as sched:
        report = audit_cache(reader, labels, cfg.loss.temperature, scheduler=sched)
        if cfg.derive.mode:
            report["derive"] = derive_for_run(cfg, reader, sched)
    report["cache"] = reader.path
    os.makedirs(run_dir, exist_ok=True)
    report["plots"] = plot_audit(report, run_dir)
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + format_audit(report), flush=True)
    if "derive" in report:
        d = report["derive"]
        print(f"derived {d['modes']} cache (K={d['k']}, {d['dtype']}) at {d['path']}: {d['storage_ratio']:.4f} of "
              f"the parent's bytes, mean KL(full || derived) {d['fidelity_kl']:.3g} on {d['fidelity_split']} "
              f"at T={d['fidelity_temperature']}", flush=True)
    if report["nonfinite"]:
        raise ValueError(f"cache {reader.path!r} holds {report['nonfinite']} non-finite teacher values "
                         "(see audit.json per split); re-capture it")
    return report



def lm_main(cfg: Config, root: str, run_dir: str) -> dict:
    from pipeline.token_audit import audit_tokens, format_token_audit
    from pipeline.token_capture import open_token_cache

    reader, _ = open_token_cache(cfg, root)
    if cfg.verify:
        reader.verify()
        log.info("verified %d shard checksums and the offsets", len(reader.manifest.shards))
    with scheduler(cfg.dask.scheduler, cfg.dask.workers) as sched:
        report = audit_tokens(reader, scheduler=sched)
    report["cache"] = reader.path
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + format_token_audit(report), flush=True)
    if report["nonfinite"]:
        raise ValueError(f"cache {reader.path!r} holds {report['nonfinite']} non-finite values; re-capture it")
    return report
