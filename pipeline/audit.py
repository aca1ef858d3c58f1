"""Stage 2's audit: one out-of-core Dask pass over the cache, per split.

Per split: rows, teacher accuracy against labels (labeled splits), mean entropy and
confidence of the teacher distribution at temperature T, and the count of non-finite
values. Each Dask block reduces to one small vector; only those vectors meet in memory.
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from pipeline.cache import CacheReader
from pipeline.datasets import UNLABELED

log = logging.getLogger(__name__)

_FIELDS = ("rows", "finite_rows", "labeled", "correct", "entropy", "confidence", "nonfinite")


def block_stats(ids: np.ndarray, logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Sums of the audit quantities over one block, as a (1, 7) float64 array."""
    ids = ids.ravel()
    z = logits.astype(np.float64) / temperature  # (B, C)
    finite = np.isfinite(z).all(axis=1)
    nonfinite = float((~np.isfinite(z)).sum())
    z = z[finite]
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    y = labels[ids[finite]]
    has = y != UNLABELED
    correct = float((logits[finite][has].argmax(axis=1) == y[has]).sum())
    entropy = float(-(p * logp).sum())
    return np.array([[len(ids), finite.sum(), has.sum(), correct, entropy, p.max(axis=1).sum(), nonfinite]])


class _TqdmCallback(Callback):
    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bar.update()


def audit_cache(reader: CacheReader, labels: np.ndarray, temperature: float) -> dict:
    """Audit every split of the cache; ``labels`` is indexed by cached id."""
    out = {"rows": reader.manifest.rows, "num_classes": reader.num_classes, "dtype": reader.manifest.dtype,
           "temperature": temperature, "splits": {}}
    lazy = {}
    for name in reader.manifest.splits:
        start, stop = reader.split_range(name)
        ids, logits = reader.ids[start:stop], reader.logits[start:stop]
        if stop == start:
            continue
        per_block = da.map_blocks(block_stats, ids[:, None], logits, labels=labels, temperature=temperature,
                                  dtype=np.float64, chunks=((1,) * logits.numblocks[0], (len(_FIELDS),)))
        lazy[name] = per_block.sum(axis=0)
    n_tasks = sum(len(v.__dask_graph__()) for v in lazy.values())
    with tqdm(total=n_tasks, desc="stage 2: audit", unit="task", leave=False) as bar, _TqdmCallback(bar):
        sums = dict(zip(lazy, dask.compute(*lazy.values()), strict=False))
    for name, s in sums.items():
        out["splits"][name] = _summarize(dict(zip(_FIELDS, s.tolist(), strict=False)))
    out["nonfinite"] = int(sum(s["nonfinite"] for s in out["splits"].values()))
    return out


def _summarize(s: dict) -> dict:
    finite_rows = s["finite_rows"]  # rows with non-finite values are excluded from the means
    return {
        "rows": int(s["rows"]),
        "labeled_rows": int(s["labeled"]),
        "teacher_acc": s["correct"] / s["labeled"] if s["labeled"] else None,
        "mean_entropy": s["entropy"] / max(finite_rows, 1),
        "mean_confidence": s["confidence"] / max(finite_rows, 1),
        "nonfinite": int(s["nonfinite"]),
    }


def format_audit(report: dict) -> str:
    lines = [f"cache audit: {report['rows']} rows x {report['num_classes']} classes, {report['dtype']}, "
             f"T={report['temperature']}",
             "| split | rows | teacher acc | mean entropy | mean confidence | non-finite |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["splits"].items():
        acc = "-" if s["teacher_acc"] is None else f"{s['teacher_acc']:.4f}"
        lines.append(f"| {name} | {s['rows']} | {acc} | {s['mean_entropy']:.4f} | {s['mean_confidence']:.4f} "
                     f"| {s['nonfinite']} |")
    return "\n".join(lines)
