"""Cache I/O: write and read throughput of each backend against raw numpy.save/load on
the same array in the same run, and bytes per row of each representation.

Two reads of each cache, opened once (as a job opens it, then reads; the opening, manifest
and checks included, is timed on its own: ``<backend>_open_ms``), both with every checksum
verified: ``<backend>_read`` is the read every stream uses
(:meth:`pipeline.stream.CacheRows.read_rows`: rows straight into one buffer, then checked for
NaN and infinity as every batch is), ``<backend>_dask_read`` the Dask array computed whole
(blocks read, then concatenated), as whole-cache jobs see it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from pipeline.cache import CacheWriter, Manifest, Storage, make_fingerprint, open_cache, plan_shards
from pipeline.cache.format import LOGITS, row_bytes
from pipeline.stream import CacheRows


def manifest(backend: str, rows: int, classes: int, modes=("full",), k=64, samples=64,
             compression: str = "ints") -> Manifest:
    chunk = 4096
    return Manifest(backend=backend, modes=list(modes), dtype="float16", num_classes=classes, rows=rows,
                    chunk_rows=chunk, shard_rows=chunk * 8, splits={"train": [0, rows]},
                    fingerprint=make_fingerprint({"bench": True}), shards=plan_shards(rows, chunk * 8),
                    k=k if "topk" in modes else 0, samples=samples if "sampled" in modes else 0,
                    compression=compression)


def write_backend(path: str, backend: str, logits: np.ndarray, compression: str) -> None:
    m = manifest(backend, *logits.shape, compression=compression)
    with CacheWriter(storage=Storage(path), manifest=m) as w:
        for s in w.pending():
            w.submit(s, {"ids": np.arange(s.start, s.stop, dtype=np.int64), "logits": logits[s.start:s.stop]})


def opened(path: str) -> tuple:
    """The cache opened as a job opens it (manifest, fingerprint and shard checks), and its rows reader."""
    reader = open_cache(path)
    return reader, CacheRows(reader, (LOGITS,))


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bytes_per_row() -> dict:
    out = {}
    for c in (10, 1000, 32000):
        k = min(64, c)
        m = manifest("zarr", 1, c, modes=("full", "topk", "sampled"), k=k)
        out[f"c{c}"] = {"full_fp16": row_bytes(m, ("full",)), f"topk{k}": row_bytes(m, ("topk",)),
                        "sampled64": row_bytes(m, ("sampled",))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((args.rows, args.classes)) * 3).astype(np.float16)
    gb = logits.nbytes / 1e9
    tmp = tempfile.mkdtemp(prefix="bench-cache-io-")
    res: dict = {"rows": args.rows, "classes": args.classes, "gb": round(gb, 4)}
    try:
        npy = os.path.join(tmp, "a.npy")
        res["npy_write_gbps"] = gb / timed(lambda: np.save(npy, logits), args.repeats)
        res["npy_read_gbps"] = gb / timed(lambda: np.load(npy), args.repeats)
        for backend, compression in (("zarr", "ints"), ("arrow", "ints"), ("zarr", "all"), ("arrow", "all")):
            name = backend if compression == "ints" else f"{backend}_zstd"
            path = os.path.join(tmp, name)

            def write(backend=backend, path=path, compression=compression):
                shutil.rmtree(path, ignore_errors=True)
                write_backend(path, backend, logits, compression)

            res[f"{name}_write_gbps"] = gb / timed(write, args.repeats)
            reader, rows = opened(path)
            assert np.array_equal(rows.read_rows(0, len(logits))[LOGITS], logits)
            assert np.array_equal(reader.logits.compute(), logits)
            res[f"{name}_open_ms"] = 1e3 * timed(lambda path=path: opened(path), args.repeats)
            res[f"{name}_read_gbps"] = gb / timed(lambda rows=rows: rows.read_rows(0, len(logits)), args.repeats)
            res[f"{name}_dask_read_gbps"] = gb / timed(lambda reader=reader: reader.logits.compute(), args.repeats)
            res[f"{name}_disk_bytes_per_row"] = round(sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / args.rows, 1)
            res[f"{name}_read_vs_npy"] = res[f"{name}_read_gbps"] / res["npy_read_gbps"]
            res[f"{name}_dask_read_vs_npy"] = res[f"{name}_dask_read_gbps"] / res["npy_read_gbps"]
            res[f"{name}_write_vs_npy"] = res[f"{name}_write_gbps"] / res["npy_write_gbps"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bpr = bytes_per_row()
    res["bytes_per_row"] = bpr
    for c in (10, 1000, 32000):
        k = min(64, c)
        res[f"topk{k}_vs_full_fp16_bytes_c{c}"] = bpr[f"c{c}"][f"topk{k}"] / bpr[f"c{c}"]["full_fp16"]
        res[f"sampled64_vs_full_fp16_bytes_c{c}"] = bpr[f"c{c}"]["sampled64"] / bpr[f"c{c}"]["full_fp16"]
    for key in ("zarr_read_vs_npy", "arrow_read_vs_npy", "zarr_zstd_read_vs_npy", "arrow_zstd_read_vs_npy",
                "zarr_dask_read_vs_npy", "arrow_dask_read_vs_npy", "zarr_write_vs_npy", "arrow_write_vs_npy"):
        print(f"{key:28s} {res[key]:.3f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
