"""Stage 2's audit: one out-of-core Dask pass over any cache, per split.

Each Dask block (a Zarr chunk or Arrow record batch) reduces to a small :class:`Stats` of
sums and histograms; only those meet in memory, so the pass is bounded whatever the cache's
size, and it runs unchanged on a ``dask.distributed`` cluster (its progress bar counts
blocks as they finish, there too). What is measured depends on what the cache holds:

- every cache: rows, the teacher's accuracy against the rows' labels where there are
  labels (samples' classes; a token's next token), non-finite values per shard, bytes
  per row as computed from the format and as found on storage;
- ``full``: the teacher's entropy and confidence at T with their histograms, a reliability
  diagram with the expected calibration error (ECE: labeled rows, 15 equal-width bins),
  the top-K mass coverage curve (K = 1..256: what K to cache);
- ``topk`` (with T among its temperatures): the confidence, reliability and ECE exactly
  (the top logit and the row's logsumexp are cached), the mass the first k of the cached
  K keep (k = 1..K), and the kept mass's distribution (what share of rows keep less);
- ``sampled``: the teacher's entropy at the sampling temperature, distinct ids per row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from pipeline.cache import CacheReader
from pipeline.cache.format import (
    GROUP,
    ITEMSIZE,
    LOGITS,
    LSE,
    SAMPLED_CNT,
    SAMPLED_ENT,
    TOP1,
    TOPK_IDX,
    TOPK_VAL,
    array_specs,
    row_bytes,
)

log = logging.getLogger(__name__)

CONF_BINS = 15  # reliability diagram / ECE
HIST_BINS = 20
MASS_BINS = 1000  # kept top-K mass: its percentiles to 0.001
MAX_K = 256
TOP_P = (0.5, 0.8, 0.9, 0.95, 0.99)  # adaptive top-k: the entries a row needs to keep this much mass
DRAWS = tuple(2**i for i in range(9))  # sampled: the distinct ids expected among 1..256 draws
UNLABELED = -1


def _zeros(n: int):
    return field(default_factory=lambda: np.zeros(n))


@dataclass
class Stats:
    """Sums over rows; ``+`` merges two blocks. Arrays of length 0 were not measured."""

    rows: int = 0
    finite_rows: int = 0
    labeled: int = 0
    correct: int = 0
    confidence: float = 0.0
    entropy: float = 0.0
    sample_entropy: float = 0.0
    distinct: float = 0.0
    conf_hist: np.ndarray = _zeros(0)
    ent_hist: np.ndarray = _zeros(0)
    rel_count: np.ndarray = _zeros(0)
    rel_correct: np.ndarray = _zeros(0)
    rel_conf: np.ndarray = _zeros(0)
    coverage: np.ndarray = _zeros(0)  # (K,) summed top-K mass
    mass_hist: np.ndarray = _zeros(0)  # (MASS_BINS,) rows by the mass their cached top-K keep
    k_needed: np.ndarray = _zeros(0)  # (len(TOP_P),) summed smallest k whose mass reaches each p (at most K)
    p_reached: np.ndarray = _zeros(0)  # (len(TOP_P),) rows whose cached top-K reach each p
    distinct_at: np.ndarray = _zeros(0)  # (len(DRAWS),) summed expected distinct ids among S draws
    nonfinite: dict = field(default_factory=dict)  # shard index -> non-finite values

    def __add__(self, o: Stats) -> Stats:
        out = Stats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(o, f.name)
            if f.name == "nonfinite":
                merged = dict(a)
                for k, v in b.items():
                    merged[k] = merged.get(k, 0) + v
                setattr(out, f.name, merged)
            elif isinstance(a, np.ndarray):
                setattr(out, f.name, a + b if len(a) and len(b) else (a if len(a) else b))  # an empty block: none
            else:
                setattr(out, f.name, a + b)
        return out


def _softmax_stats(st: Stats, z: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy, confidence and the top-K coverage of full rows ``z`` (logits / T, float64)."""
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    ent = -(p * logp).sum(axis=1)
    st.entropy = float(ent.sum())
    st.ent_hist = np.histogram(ent, HIST_BINS, (0.0, max(np.log(c), 1e-9)))[0].astype(float)
    kmax = min(MAX_K, c)
    top = -np.sort(-p, axis=1)[:, :kmax] if len(p) else np.zeros((0, kmax))
    st.coverage = np.cumsum(top, axis=1).sum(axis=0)
    _mass_stats(st, top)
    return p.max(axis=1), ent


def _mass_stats(st: Stats, p: np.ndarray) -> None:
    """From each row's largest probabilities ``p`` (n, K), largest first: the entries an
    adaptive row keeps at each of TOP_P, and the distinct ids expected among S draws,
    sum_j 1 - (1 - p_j)^S over the K plus S times the rest's mass (each draw there counted
    as new: an upper bound). What the planner sizes adaptive and sampled caches by."""
    cum = np.cumsum(p, axis=1)
    k = p.shape[1]
    st.k_needed = np.array([np.minimum((cum < q).sum(axis=1) + 1, k).sum() for q in TOP_P], float)
    st.p_reached = np.array([(cum[:, -1] >= q).sum() for q in TOP_P], float) if k else np.zeros(len(TOP_P))
    tail = np.clip(1.0 - cum[:, -1], 0.0, 1.0) if k else np.ones(len(p))
    st.distinct_at = np.array([(1.0 - (1.0 - p) ** s).sum() + (s * tail).sum() for s in DRAWS], float)


def block_stats(arrays: dict[str, np.ndarray], labels: np.ndarray, temperature: float, lse_column: int | None,
                num_classes: int, shard: int) -> Stats:
    """The audit's sums over one block of cached rows (``arrays``: the block of every array
    of the cache but ``ids``; ``labels``: the block's rows' labels, -1 where none)."""
    floats = {n: a.reshape(len(a), -1) for n, a in arrays.items() if a.dtype.kind == "f"}
    # (-inf in topk_val is a probability of 0: an adaptive row's padding)
    bad = [~(np.isfinite(a) | np.isneginf(a)) if n == TOPK_VAL else ~np.isfinite(a) for n, a in floats.items()]
    finite = ~np.any([b.any(axis=1) for b in bad], axis=0) if bad else np.ones(len(labels), bool)
    st = Stats(rows=len(labels), finite_rows=int(finite.sum()), nonfinite={shard: int(sum(b.sum() for b in bad))})
    conf = None
    if LOGITS in arrays:
        conf, _ = _softmax_stats(st, arrays[LOGITS][finite].astype(np.float64) / temperature, num_classes)
    if TOPK_VAL in arrays and lse_column is not None:
        log_p = arrays[TOPK_VAL][finite].astype(np.float64) / temperature - \
            arrays[LSE][finite][:, lse_column:lse_column + 1].astype(np.float64)
        kept = np.cumsum(np.exp(log_p), axis=1)  # (n, K): mass of the first k cached logits
        if LOGITS not in arrays:
            st.coverage, conf = kept.sum(axis=0), np.exp(log_p[:, 0])
            _mass_stats(st, np.exp(log_p))
        st.mass_hist = np.histogram(kept[:, -1], MASS_BINS, (0.0, 1.0))[0].astype(float)
    if SAMPLED_ENT in arrays:
        st.sample_entropy = float(arrays[SAMPLED_ENT][finite].astype(np.float64).sum())
        st.distinct = float((arrays[SAMPLED_CNT][finite] > 0).sum())
    pred = _prediction(arrays)
    y = labels[finite]
    has = y != UNLABELED
    right = pred[finite][has] == y[has] if pred is not None else np.zeros(0, bool)
    if pred is not None:
        st.labeled, st.correct = int(has.sum()), int(right.sum())
    if conf is not None:
        st.confidence = float(conf.sum())
        st.conf_hist = np.histogram(conf, HIST_BINS, (0.0, 1.0))[0].astype(float)
        if pred is not None:
            b = np.minimum((conf[has] * CONF_BINS).astype(int), CONF_BINS - 1)
            st.rel_count = np.bincount(b, minlength=CONF_BINS).astype(float)
            st.rel_correct = np.bincount(b, weights=right, minlength=CONF_BINS)
            st.rel_conf = np.bincount(b, weights=conf[has], minlength=CONF_BINS)
    return st


def _prediction(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The teacher's argmax per row: exact from the top-k ids or ``top1``; from the stored
    logits otherwise (float16 rounding can tie them)."""
    if TOPK_IDX in arrays:
        return arrays[TOPK_IDX][:, 0]
    if TOP1 in arrays:
        return arrays[TOP1]
    if LOGITS in arrays:
        return arrays[LOGITS].argmax(axis=1)
    return None


def _block_tasks(reader: CacheReader, name: str, labels, temperature: float, lse_column: int | None) -> list:
    start, stop = reader.split_range(name)
    arrays = {n: a[start:stop] for n, a in reader.arrays.items() if n != "ids"}
    first = next(iter(arrays.values()))
    bounds = np.cumsum((0, *first.chunks[0])) + start
    return [dask.delayed(block_stats)({n: a.blocks[b] for n, a in arrays.items()},
                                      labels[bounds[b]:bounds[b + 1]], temperature, lse_column,
                                      reader.num_classes, int(bounds[b] // reader.manifest.shard_rows))
            for b in range(first.numblocks[0])]


class _BlockProgress(Callback):
    """Local schedulers: advance the bar as each block's statistics finish."""

    def __init__(self, bar: tqdm, keys: set):
        super().__init__()
        self.bar, self.keys = bar, keys

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self.keys:
            self.bar.update()


def compute_blocks(tasks: list, scheduler=None, desc: str = "stage 2: audit") -> list:
    """Compute delayed tasks with a progress bar that moves on every scheduler: local ones
    through a callback, a ``distributed.Client`` through its futures (local callbacks do
    not see a cluster's tasks)."""
    with tqdm(total=len(tasks), desc=desc, unit="block", leave=False) as bar:
        if hasattr(scheduler, "compute") and hasattr(scheduler, "gather"):  # a distributed Client
            futures = scheduler.compute(tasks)
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
            return scheduler.gather(futures)
        with _BlockProgress(bar, {t.key for t in tasks}):
            return list(dask.compute(*tasks, scheduler=scheduler))


def audit_cache(reader: CacheReader, labels: np.ndarray, temperature: float, scheduler=None) -> dict:
    """Audit every split of the cache; ``labels`` gives each cache row's label (-1: none)."""
    m = reader.manifest
    if len(labels) != m.rows:
        raise ValueError(f"the audit has {len(labels)} labels for a cache of {m.rows} rows")
    lse_column = m.temperatures.index(temperature) if "topk" in m.modes and temperature in m.temperatures else None
    if "topk" in m.modes and lse_column is None:
        log.info("audit: the cache's top-k tail mass is known at T=%s, not at loss.temperature=%s: top-k mass and "
                 "confidence are not reported", m.temperatures, temperature)
    labels_d = dask.delayed(labels, pure=True)  # one copy in the graph, shared by every block
    per_split = {name: _block_tasks(reader, name, labels_d, temperature, lse_column) for name in m.splits}
    flat = [t for tasks in per_split.values() for t in tasks]
    results = iter(compute_blocks(flat, scheduler))
    out = {"rows": m.rows, "num_classes": reader.num_classes, "dtype": m.dtype, "modes": m.modes,
           "temperature": temperature, "splits": {}}
    if m.sequences:
        out["sequences"] = m.sequences
    if m.task:
        out["task"] = m.task
    per_shard: dict[int, int] = {}
    for name, tasks in per_split.items():
        stats = [next(results) for _ in tasks]
        if not stats:
            continue
        total = sum(stats[1:], stats[0])
        out["splits"][name] = summarize(total)
        for k, v in total.nonfinite.items():
            per_shard[k] = per_shard.get(k, 0) + v
    out["nonfinite"] = int(sum(per_shard.values()))
    out["nonfinite_per_shard"] = {str(k): v for k, v in sorted(per_shard.items())}
    out["bytes_per_row"] = representation_bytes(reader)
    return out


def _percentile(hist: np.ndarray, q: float) -> float:
    """The q-th percentile of values in [0, 1] from their histogram (to a bin's width)."""
    cum = np.cumsum(hist)
    return float((np.searchsorted(cum, q / 100 * cum[-1]) + 1) / len(hist))


def summarize(s: Stats) -> dict:
    n = max(s.finite_rows, 1)  # rows with non-finite values are excluded from the means
    out = {"rows": s.rows, "labeled_rows": s.labeled, "teacher_acc": s.correct / s.labeled if s.labeled else None,
           "nonfinite": int(sum(s.nonfinite.values()))}
    if len(s.conf_hist):
        out |= {"mean_confidence": s.confidence / n, "confidence_hist": s.conf_hist.astype(int).tolist()}
    if len(s.rel_count):
        acc_bins = np.divide(s.rel_correct, s.rel_count, out=np.zeros(CONF_BINS), where=s.rel_count > 0)
        conf_bins = np.divide(s.rel_conf, s.rel_count, out=np.zeros(CONF_BINS), where=s.rel_count > 0)
        out["ece"] = float((s.rel_count * np.abs(acc_bins - conf_bins)).sum() / s.labeled) if s.labeled else None
        out["reliability"] = {"count": s.rel_count.astype(int).tolist(), "accuracy": acc_bins.tolist(),
                              "confidence": conf_bins.tolist()}
    if len(s.ent_hist):
        out |= {"mean_entropy": s.entropy / n, "entropy_hist": s.ent_hist.astype(int).tolist()}
    if len(s.coverage):
        out["coverage"] = (s.coverage / n).tolist()  # mean mass kept by the top K, K = 1..len
    if len(s.mass_hist) and s.mass_hist.sum():
        out["topk_mass_p10"] = _percentile(s.mass_hist, 10)  # 10% of rows keep less than this
    if len(s.k_needed):  # what adaptive top-k and sampled caches would hold
        out["adaptive_k"] = {str(q): s.k_needed[i] / n for i, q in enumerate(TOP_P)}
        out["adaptive_reached"] = {str(q): s.p_reached[i] / n for i, q in enumerate(TOP_P)}
        out["expected_distinct"] = {str(d): s.distinct_at[i] / n for i, d in enumerate(DRAWS)}
    if s.distinct:
        out |= {"mean_sample_entropy": s.sample_entropy / n, "distinct_sampled_mean": s.distinct / n}
    return out


def representation_bytes(reader: CacheReader) -> dict[str, float]:
    """Bytes per row of each representation: as the format computes them (ids aside) and
    as stored (Zarr: each array's folder; in all: every object of the cache)."""
    m, fs, root = reader.manifest, reader.storage.fs, reader.storage.path()
    out: dict[str, float] = {f"{mode}_computed": row_bytes(m, (mode,)) for mode in m.modes}
    if "full" not in m.modes:
        out["full_float16_computed"] = 2 * m.num_classes  # what the sparse forms are spared
    out["ids_computed"] = ITEMSIZE["int64"]
    if m.backend == "zarr":
        disk = {name: int(fs.du(f"{root}/{GROUP}/{name}")) for name in array_specs(m)}
        for mode in m.modes:
            names = [n for n in array_specs(replace(m, modes=[mode])) if n != "ids"]
            out[f"{mode}_on_disk"] = sum(disk.get(n, 0) for n in names) / m.rows
    out["total_on_disk"] = int(fs.du(root)) / m.rows
    return out


def format_audit(report: dict) -> str:
    splits = report["splits"].values()
    sparse = any(k in s for s in splits for k in ("topk_mass_p10", "distinct_sampled_mean"))
    head = f"cache audit: {report['rows']:,} rows x {report['num_classes']:,} classes, {report['dtype']}, " \
           f"modes {report['modes']}, T={report['temperature']}"
    cols = ["split", "rows", "teacher acc", "ECE", "mean entropy", "mean confidence", "top-1/4/16 mass", "non-finite"]
    if sparse:
        cols[-1:-1] = ["top-K mass (K)", "10% keep less than", "sample entropy", "distinct ids/row"]
    lines = [head, "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]

    def num(s: dict, key: str, fmt: str = ".4f") -> str:
        return "-" if s.get(key) is None else format(s[key], fmt)

    for name, s in report["splits"].items():
        cov = s.get("coverage", [])
        mass = "/".join(f"{cov[k - 1]:.3f}" for k in (1, 4, 16) if k <= len(cov)) or "-"
        cells = [name, f"{s['rows']}", num(s, "teacher_acc"), num(s, "ece"), num(s, "mean_entropy"),
                 num(s, "mean_confidence"), mass, f"{s['nonfinite']}"]
        if sparse:
            cells[-1:-1] = [f"{cov[-1]:.3f} ({len(cov)})" if cov else "-", num(s, "topk_mass_p10", ".3f"),
                            num(s, "mean_sample_entropy", ".3f"), num(s, "distinct_sampled_mean", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    b = report.get("bytes_per_row", {})
    if b:
        lines.append("bytes per row: " + ", ".join(f"{k} {v:,.1f}" for k, v in b.items()))
    return "\n".join(lines)


def plot_audit(report: dict, folder: str) -> list[str]:
    """PNG plots of what the report holds: confidence and entropy histograms, reliability
    diagram, top-K coverage curve, one line or bar set per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    files = []
    splits = report["splits"]
    T = report["temperature"]
    specs = [("confidence", "confidence_hist", f"teacher confidence at T={T}", "max probability", "rows"),
             ("entropy", "entropy_hist", f"teacher entropy at T={T}", "entropy (nats)", "rows"),
             ("reliability", "reliability", "reliability (labeled rows)", "confidence", "accuracy"),
             ("coverage", "coverage", f"probability mass kept by the top K (T={T})", "K", "mean mass kept")]
    for key, needs, title, xlabel, ylabel in specs:
        if not any(needs in s for s in splits.values()):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, s in splits.items():
            if needs not in s:
                continue
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
