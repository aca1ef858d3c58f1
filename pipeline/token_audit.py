"""Stage 2 for task=lm: audit a token cache as Dask jobs (out of core).

Per split: tokens and sequences; how much probability mass the first k of the cached
top-K keep (k = 1..K, the curve that says what K to cache); the teacher's entropy at the
sampling temperature; distinct ids per sampled row; non-finite values. Plus bytes per
token of each representation, as computed from the format and as found on disk.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from pipeline.cache import CacheReader
from pipeline.cache.format import (
    IDS,
    ITEMSIZE,
    LSE,
    SAMPLED_CNT,
    SAMPLED_ENT,
    TOPK_IDX,
    TOPK_VAL,
    array_specs,
    row_bytes,
)


def _kept_mass(val: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """(n, K) cumulative teacher probability of the first k cached logits, at T=1."""
    return np.cumsum(np.exp(val.astype(np.float32) - lse), axis=1)  # lse: (n, 1)


def split_audit(reader: CacheReader, name: str) -> dict:
    """The lazy (Dask) statistics of one split's rows."""
    a, z = reader.split_range(name)
    arr = {n: x[a:z] for n, x in reader.arrays.items()}
    out = {"tokens": z - a, "nonfinite": sum(
        (~da.isfinite(x)).sum() for x in arr.values() if np.issubdtype(x.dtype, np.floating))}
    m = reader.manifest
    if "topk" in m.modes and 1.0 in m.temperatures:
        col = m.temperatures.index(1.0)
        lse = arr[LSE][:, col:col + 1]
        mass = da.map_blocks(_kept_mass, arr[TOPK_VAL], lse, dtype=np.float32, chunks=arr[TOPK_VAL].chunks)
        out["topk_mass_mean"] = mass.mean(axis=0)  # (K,)
        out["topk_mass_p10"] = da.percentile(mass[:, -1].rechunk(-1), 10)
    if "sampled" in m.modes:
        out["entropy_mean"] = arr[SAMPLED_ENT].mean()
        out["distinct_sampled_mean"] = (arr[SAMPLED_CNT] > 0).sum(axis=1).mean()
    return out


def disk_bytes(reader: CacheReader) -> dict[str, int]:
    """Bytes on storage per array (Zarr: each array's folder) and in all."""
    fs, root = reader.storage.fs, reader.storage.path()
    sizes = {}
    if reader.manifest.backend == "zarr":
        for name in array_specs(reader.manifest):
            sizes[name] = int(fs.du(f"{root}/{name}"))
    sizes["total"] = int(fs.du(root))
    return sizes


def representation_bytes(reader: CacheReader) -> dict[str, float]:
    """Bytes per token of each representation in the cache's layout, as stored on disk."""
    m, disk = reader.manifest, disk_bytes(reader)
    groups = {"topk": (TOPK_IDX, TOPK_VAL, LSE), "sampled": ("sampled_idx", SAMPLED_CNT, SAMPLED_ENT),
              "ids": (IDS,)}
    out = {"full_float16_computed": m.num_classes * 2}
    for mode, names in groups.items():
        if mode == "ids" or mode in m.modes:
            out[f"{mode}_computed"] = ITEMSIZE["int64"] if mode == "ids" else row_bytes(m, (mode,))
            if all(n in disk for n in names):
                out[f"{mode}_on_disk"] = sum(disk[n] for n in names) / m.rows
    out["total_on_disk"] = disk["total"] / m.rows
    return out


def audit_tokens(reader: CacheReader, scheduler=None) -> dict:
    lazy = {name: split_audit(reader, name) for name in reader.manifest.splits}
    (done,) = dask.compute(lazy, scheduler=scheduler)
    report = {"rows": reader.manifest.rows, "sequences": reader.manifest.sequences, "vocab": reader.manifest.vocab,
              "modes": reader.manifest.modes, "splits": {}, "nonfinite": 0,
              "bytes_per_token": representation_bytes(reader)}
    for name, s in done.items():
        row = {k: (v.tolist() if isinstance(v, np.ndarray) else float(v) if isinstance(v, np.generic) else v)
               for k, v in s.items()}
        row["nonfinite"] = int(row["nonfinite"])
        report["nonfinite"] += row["nonfinite"]
        report["splits"][name] = row
    return report


def format_token_audit(report: dict) -> str:
    lines = ["| split | tokens | top-K mass kept (k=1 / 16 / K) | 10% of tokens keep less than | teacher entropy | "
             "distinct ids per sampled row | non-finite |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, s in report["splits"].items():
        mass = s.get("topk_mass_mean")
        kept = " / ".join(f"{mass[i]:.3f}" for i in (0, min(15, len(mass) - 1), len(mass) - 1)) if mass else "-"
        p10 = f"{s['topk_mass_p10']:.3f}" if "topk_mass_p10" in s else "-"
        ent = f"{s['entropy_mean']:.3f}" if "entropy_mean" in s else "-"
        dis = f"{s['distinct_sampled_mean']:.2f}" if "distinct_sampled_mean" in s else "-"
        lines.append(f"| {name} | {s['tokens']:,} | {kept} | {p10} | {ent} | {dis} | {s['nonfinite']} |")
    b = report["bytes_per_token"]
    lines.append("\nbytes per token: " + ", ".join(f"{k} {v:,.1f}" for k, v in b.items()))
    return "\n".join(lines)
