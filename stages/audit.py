"""Stage 2: open the cache lazily with Dask, check it, audit it, write ``audit.json``;
optionally derive a smaller cache from it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from pipeline.audit import audit_cache, format_audit, plot_audit
from pipeline.cluster import scheduler
from pipeline.config import Config, DeriveMode
from pipeline.derive import derive_for_run
from pipeline.errors import CacheError, ConfigError
from pipeline.planner import describe, plan
from pipeline.processes import Processes
from pipeline.tasks import task_for

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str, processes: Processes | None = None) -> dict:
    task = task_for(cfg, processes)
    data = task.load_data()
    reader = task.open_cache(data)
    if cfg.verify:
        reader.verify()
        log.info("verified %d shard checksums", len(reader.manifest.shards))
    with scheduler(cfg.dask.scheduler, cfg.dask.workers) as sched:
        report = audit_cache(reader, task.row_labels(data, reader), cfg.loss.temperature, scheduler=sched)
        derive = cfg.derive
        if cfg.cache.budget_bytes_per_token:
            p = plan(report, reader.manifest, cfg.cache.budget_bytes_per_token)
            print(describe(p), flush=True)
            c = p["choice"]
            report["plan"] = {"budget": p["budget"], "choice": c and {"name": c.name, "settings": c.settings,
                                                                      "bytes_per_token": c.bytes_per_token},
                              "fits": [{"name": x.name, "bytes_per_token": x.bytes_per_token} for x in p["fits"]]}
            if derive.mode is DeriveMode.auto:
                if c is None:
                    raise ConfigError(describe(p))
                derive = dataclasses.replace(derive, **{**c.settings, "mode": DeriveMode(c.settings["mode"])})
        if derive.mode:
            report["derive"] = derive_for_run(derive, cfg.cache, cfg.loss.temperature, reader, sched, verify=cfg.verify)
    report["cache"] = reader.path
    os.makedirs(run_dir, exist_ok=True)
    report["plots"] = plot_audit(report, run_dir)
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + format_audit(report), flush=True)
    if "derive" in report:
        d = report["derive"]
        kl = (f"mean KL(full || derived) {d['fidelity_kl']:.3g} on {d['fidelity_split']} at "
              f"T={d['fidelity_temperature']}" if d["fidelity_kl"] is not None else "no full logits to compare with")
        size = f"K={d['k']}, {d['dtype']}" if d["k"] else f"S={d['samples']}" if d["samples"] else d["dtype"]
        print(f"derived {d['modes']} cache ({size}) at {d['path']}: {d['storage_ratio']:.4f} of "
              f"the parent's bytes, {kl}", flush=True)
    if report["nonfinite"]:
        raise CacheError(f"cache {reader.path!r} holds {report['nonfinite']} non-finite teacher values "
                         "(see audit.json per split); re-capture it")
    return report
