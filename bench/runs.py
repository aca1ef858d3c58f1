"""What the student benchmarks share: the real CLI in a subprocess, a resumable state file,
one stage-3 student run read back from its results, and seed-paired statistics.

Imported by ``bench/frontier.py`` and ``bench/quality.py`` (run as scripts, so this folder
is on their path)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time


def cli(*args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline.run task=lm *args``; exits with the run's output tail if it fails."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "task=lm", *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"failed: pipeline.run task=lm {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def complete(path: str) -> bool:
    """Whether a whole cache is at ``path`` (a capture killed part way leaves a manifest and
    uncommitted shards: stage 1 again finishes it)."""
    from pipeline.cache import open_cache
    from pipeline.errors import CacheError, CacheNotFound

    try:
        open_cache(path)
    except (CacheError, CacheNotFound):
        return False
    return True


def load(path: str, empty: dict) -> dict:
    return json.load(open(path)) if os.path.exists(path) else empty


def open_state(root: str, name: str, empty: dict, overrides: list[str]) -> tuple[str, str, dict]:
    """A benchmark's root folder (made, absolute), its state file ``<root>/<name>`` and the
    state kept there (``empty`` the first time); a root holds runs of one set of overrides."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    state = load(path, empty)
    if state.setdefault("overrides", overrides) != overrides:
        sys.exit(f"{path} holds runs with {state['overrides']}, not {overrides}: use another --root")
    return root, path, state


def save(path: str, state: dict) -> None:
    """Written whole and renamed into place: a killed benchmark keeps every finished run."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def train(root: str, run_dir: str, cache: str, variant: str, seed: int, extra: list[str],
          threads: int | None = None) -> dict:
    """One stage-3 student: ``variant`` of ``cache`` (``labels``, ``topk_kl:64``, ...) at seed
    ``seed`` (its initialisation and batch order), from scratch (no resumed state)."""
    t0 = time.perf_counter()
    cli("stage=3", f"paths.root={root}", f"cache.path={cache}", f"lm.variants=[{variant}]", f"train.seed={seed}",
        "train.resume=false", f"hydra.run.dir={run_dir}", *extra, threads=threads)
    results = json.load(open(os.path.join(run_dir, "results.json")))
    (row,) = results["students"]
    return {"ppl": row["heldout_perplexity"], "bits_per_byte": row["heldout_bits_per_byte"],
            "kl": row["heldout_kl_topk"], "seconds": time.perf_counter() - t0,
            "teacher_ppl": (results.get("teacher") or {}).get("heldout_perplexity"),
            "by_confidence": row.get("heldout_nll_by_teacher_confidence"),
            "by_target_in_topk": row.get("heldout_nll_by_target_in_topk")}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def paired(runs: dict, reference: dict, key: str = "ppl") -> tuple[float, float, int] | None:
    """Mean and sd over seeds of ``runs[seed][key] / reference[seed][key]``, the seeds both
    hold: the same initialisation and batches on both sides, so the seed's own effect (shared)
    cancels in the ratio. None where no seed is shared."""
    ratios = [r[key] / reference[seed][key] for seed, r in runs.items() if seed in reference]
    return (*mean_sd(ratios), len(ratios)) if ratios else None
