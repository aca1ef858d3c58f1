"""Stage 2's audit: one out-of-core Dask pass over the cache, per split.

Each Dask block (a Zarr chunk or Arrow record batch) reduces to a small :class:`Stats` of
sums and histograms; only those meet in memory, so the pass is bounded whatever the cache's
size, and it runs unchanged on a ``dask.distributed`` cluster. Per split it reports rows,
teacher accuracy against labels (labeled splits), mean entropy and confidence of the
teacher's distribution at T, their histograms, a reliability diagram with the expected
calibration error (ECE, labeled rows, 15 equal-width confidence bins), the top-K mass
coverage curve (mean probability mass at T kept by the K largest classes, K = 1..256: what
K to cache), and non-finite values per shard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from pipeline.cache import CacheReader
from pipeline.datasets import UNLABELED

log = logging.getLogger(__name__)

CONF_BINS = 15  # reliability diagram / ECE
HIST_BINS = 20
MAX_K = 256


@dataclass
class Stats:
    """Sums over rows; ``+`` merges two blocks."""

    rows: int = 0
    finite_rows: int = 0
    labeled: int = 0
    correct: int = 0
    entropy: float = 0.0
    confidence: float = 0.0
    conf_hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS))
    ent_hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS))
    rel_count: np.ndarray = field(default_factory=lambda: np.zeros(CONF_BINS))
    rel_correct: np.ndarray = field(default_factory=lambda: np.zeros(CONF_BINS))
    rel_conf: np.ndarray = field(default_factory=lambda: np.zeros(CONF_BINS))
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) summed top-K mass
    nonfinite: dict = field(default_factory=dict)  # shard index -> non-finite values

    def __add__(self, o: Stats) -> Stats:
        cov = self.coverage + o.coverage if len(self.coverage) and len(o.coverage) else \
            (self.coverage if len(self.coverage) else o.coverage)  # an empty block has no curve
        nf = dict(self.nonfinite)
        for k, v in o.nonfinite.items():
            nf[k] = nf.get(k, 0) + v
        return Stats(self.rows + o.rows, self.finite_rows + o.finite_rows, self.labeled + o.labeled,
                     self.correct + o.correct, self.entropy + o.entropy, self.confidence + o.confidence,
                     self.conf_hist + o.conf_hist, self.ent_hist + o.ent_hist, self.rel_count + o.rel_count,
                     self.rel_correct + o.rel_correct, self.rel_conf + o.rel_conf, cov, nf)


def block_stats(ids: np.ndarray, logits: np.ndarray, labels: np.ndarray, temperature: float, shard: int) -> Stats:
    """The audit's sums over one block of cached rows."""
    c = logits.shape[1]
    z = logits.astype(np.float64) / temperature  # (B, C)
    finite = np.isfinite(z).all(axis=1)
    st = Stats(rows=len(ids), finite_rows=int(finite.sum()), nonfinite={shard: int((~np.isfinite(z)).sum())})
    z = z[finite]
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    ent = -(p * logp).sum(axis=1)
    conf = p.max(axis=1)
    st.entropy, st.confidence = float(ent.sum()), float(conf.sum())
    st.conf_hist = np.histogram(conf, HIST_BINS, (0.0, 1.0))[0].astype(float)
    st.ent_hist = np.histogram(ent, HIST_BINS, (0.0, max(np.log(c), 1e-9)))[0].astype(float)
    kmax = min(MAX_K, c)
    top = -np.sort(-p, axis=1)[:, :kmax] if len(p) else np.zeros((0, kmax))
    st.coverage = np.cumsum(top, axis=1).sum(axis=0)
    y = labels[ids[finite]]
    has = y != UNLABELED
    right = logits[finite][has].argmax(axis=1) == y[has]
    st.labeled, st.correct = int(has.sum()), int(right.sum())
    b = np.minimum((conf[has] * CONF_BINS).astype(int), CONF_BINS - 1)
    st.rel_count = np.bincount(b, minlength=CONF_BINS).astype(float)
    st.rel_correct = np.bincount(b, weights=right, minlength=CONF_BINS)
    st.rel_conf = np.bincount(b, weights=conf[has], minlength=CONF_BINS)
    return st


class _TqdmCallback(Callback):
    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bar.update()


def _split_tasks(reader: CacheReader, name: str, labels, temperature: float) -> list:
    start, stop = reader.split_range(name)
    ids, logits = reader.ids[start:stop], reader.logits[start:stop]
    offsets = np.cumsum((0, *ids.chunks[0]))[:-1] + start
    return [dask.delayed(block_stats)(ids.blocks[b], logits.blocks[b], labels, temperature,
                                      int(offsets[b] // reader.manifest.shard_rows))
            for b in range(ids.numblocks[0])]


def audit_cache(reader: CacheReader, labels: np.ndarray, temperature: float, scheduler=None) -> dict:
    """Audit every split of the cache; ``labels`` is indexed by cached id."""
    out = {"rows": reader.manifest.rows, "num_classes": reader.num_classes, "dtype": reader.manifest.dtype,
           "temperature": temperature, "splits": {}}
    labels_d = dask.delayed(labels, pure=True)  # one copy in the graph, shared by every block
    per_split = {}
    for name in reader.manifest.splits:
        tasks = _split_tasks(reader, name, labels_d, temperature)
        if tasks:
            per_split[name] = dask.delayed(sum)(tasks[1:], tasks[0])
    n_tasks = sum(len(v.__dask_graph__()) for v in per_split.values())
    with tqdm(total=n_tasks, desc="stage 2: audit", unit="task", leave=False) as bar, _TqdmCallback(bar):
        sums = dict(zip(per_split, dask.compute(*per_split.values(), scheduler=scheduler), strict=True))
    for name, s in sums.items():
        out["splits"][name] = summarize(s)
    per_shard: dict[int, int] = {}
    for s in sums.values():
        for k, v in s.nonfinite.items():
            per_shard[k] = per_shard.get(k, 0) + v
    out["nonfinite"] = int(sum(per_shard.values()))
    out["nonfinite_per_shard"] = {str(k): v for k, v in sorted(per_shard.items())}
    return out


def summarize(s: Stats) -> dict:
    n = max(s.finite_rows, 1)  # rows with non-finite values are excluded from the means
    acc_bins = np.divide(s.rel_correct, s.rel_count, out=np.zeros(CONF_BINS), where=s.rel_count > 0)
    conf_bins = np.divide(s.rel_conf, s.rel_count, out=np.zeros(CONF_BINS), where=s.rel_count > 0)
    ece = float((s.rel_count * np.abs(acc_bins - conf_bins)).sum() / s.labeled) if s.labeled else None
    return {
        "rows": s.rows,
        "labeled_rows": s.labeled,
        "teacher_acc": s.correct / s.labeled if s.labeled else None,
        "mean_entropy": s.entropy / n,
        "mean_confidence": s.confidence / n,
        "ece": ece,
        "nonfinite": int(sum(s.nonfinite.values())),
        "confidence_hist": s.conf_hist.astype(int).tolist(),
        "entropy_hist": s.ent_hist.astype(int).tolist(),
        "reliability": {"count": s.rel_count.astype(int).tolist(), "accuracy": acc_bins.tolist(),
                        "confidence": conf_bins.tolist()},
        "coverage": (s.coverage / n).tolist(),  # mean mass kept by the top K, K = 1..len
    }


def format_audit(report: dict) -> str:
    lines = [f"cache audit: {report['rows']} rows x {report['num_classes']} classes, {report['dtype']}, "
             f"T={report['temperature']}",
             "| split | rows | teacher acc | ECE | mean entropy | mean confidence | top-1/4/16 mass | non-finite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["splits"].items():
        acc = "-" if s["teacher_acc"] is None else f"{s['teacher_acc']:.4f}"
        ece = "-" if s["ece"] is None else f"{s['ece']:.4f}"
        cov = s["coverage"]
        mass = "/".join(f"{cov[k - 1]:.3f}" for k in (1, 4, 16) if k <= len(cov))
        lines.append(f"| {name} | {s['rows']} | {acc} | {ece} | {s['mean_entropy']:.4f} | "
                     f"{s['mean_confidence']:.4f} | {mass} | {s['nonfinite']} |")
    return "\n".join(lines)


def plot_audit(report: dict, folder: str) -> list[str]:
    """PNG plots of the report: confidence and entropy histograms, reliability diagram,
    top-K coverage curve, one line or bar set per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    files = []
    splits = report["splits"]
    T = report["temperature"]
    specs = [("confidence", f"teacher confidence at T={T}", "max probability", "rows"),
             ("entropy", f"teacher entropy at T={T}", "entropy (nats)", "rows"),
             ("reliability", "reliability (labeled rows)", "confidence", "accuracy"),
             ("coverage", f"probability mass kept by the top K (T={T})", "K", "mean mass kept")]
    for key, title, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, s in splits.items():
            if key == "confidence":
                ax.stairs(s["confidence_hist"], np.linspace(0, 1, HIST_BINS + 1), label=name)
            elif key == "entropy":
                ax.stairs(s["entropy_hist"], np.linspace(0, np.log(report["num_classes"]), HIST_BINS + 1), label=name)
            elif key == "reliability" and s["labeled_rows"]:
                r = s["reliability"]
                used = np.array(r["count"]) > 0
                ax.plot(np.array(r["confidence"])[used], np.array(r["accuracy"])[used], "o-",
                        label=f"{name} (ECE {s['ece']:.3f})")
            elif key == "coverage":
                ax.plot(np.arange(1, len(s["coverage"]) + 1), s["coverage"], label=name)
        if key == "reliability":
            ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
        if key == "coverage":
            ax.set_xscale("log", base=2)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(folder, f"audit_{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files
