"""The stream: throughput against direct Zarr slicing of the same cache, and peak memory
while streaming a cache 1x and 10x in size, measured in the same run.

    .venv/bin/python bench/stream.py [--rows 100000] [--classes 256]

Throughput: the best steady-state epoch of a stream object (epochs 2-3, as a training run
iterates it) and its first epoch, against the best direct pass, alternated over repeats.
``throughput_vs_own_decoder`` compares the stream with its own chunk decoder reading
every chunk in order into one buffer: what the shuffle, the thread and the gathers cost.
Memory is each pass's peak resident size in a fresh subprocess (ru_maxrss), and its growth
over the process's size just before streaming. The last line is one JSON object with
``throughput_vs_direct`` and ``peak_mem_10x_vs_1x``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from pipeline.cache import CacheWriter, Manifest, Storage, make_fingerprint, open_cache, plan_shards
from pipeline.stream import CacheStream


def write(path: str, rows: int, classes: int) -> None:
    chunk = 4096
    m = Manifest(backend="zarr", modes=["full"], dtype="float16", num_classes=classes, rows=rows, chunk_rows=chunk,
                 shard_rows=chunk * 8, splits={"train": [0, rows]}, fingerprint=make_fingerprint({"bench": rows}),
                 shards=plan_shards(rows, chunk * 8))
    rng = np.random.default_rng(0)
    with CacheWriter(storage=Storage(path), manifest=m) as w:
        for s in w.pending():
            w.submit(s, {"ids": np.arange(s.start, s.stop, dtype=np.int64),
                         "logits": (rng.standard_normal((s.rows, classes)) * 3).astype(np.float16)})


def stream_epochs(path: str, epochs: int) -> list[float]:
    """Seconds per epoch of one stream object, as a training run uses it (the first epoch
    also allocates the stream's window buffers)."""
    s = CacheStream(open_cache(path), splits=("train",), batch_size=512, seed=0, shuffle_window=8, prefetch=4)
    out = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in s:
            n += len(b["ids"])
        out.append(time.perf_counter() - t0)
    return out


def direct_epoch(path: str) -> tuple[int, float]:
    import zarr

    g = zarr.open_group(os.path.join(path, "zarr"), mode="r")
    ids, logits = g["ids"], g["logits"]
    chunk = logits.chunks[0]
    t0, n = time.perf_counter(), 0
    for a in range(0, logits.shape[0], chunk):
        n += len(ids[a:a + chunk])
        logits[a:a + chunk]
    return n, time.perf_counter() - t0


def decoder_epoch(path: str) -> tuple[int, float]:
    """The stream's own read path without the stream: each chunk of ids and logits, in
    order, decoded into one reused buffer (no shuffle, no thread, no gathers)."""
    from pipeline.cache.backends import backend

    r = open_cache(path)
    read = backend("zarr").block_reader(r.storage, r.manifest)
    chunk = r.manifest.chunk_rows
    ids, logits = np.empty(chunk, np.int64), np.empty((chunk, r.manifest.num_classes), np.float16)
    t0, n = time.perf_counter(), 0
    for a in range(0, r.manifest.rows, chunk):
        b = min(a + chunk, r.manifest.rows)
        read([("ids", a, b, ids[:b - a]), ("logits", a, b, logits[:b - a])])
        n += b - a
    return n, time.perf_counter() - t0


def child(path: str) -> None:
    """Stream one epoch; print the resident size before and the peak (KiB)."""
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    stream_epochs(path, 2)
    print(json.dumps({"before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak(path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    tmp = tempfile.mkdtemp(prefix="bench-stream-")
    try:
        one, ten = f"{tmp}/1x", f"{tmp}/10x"
        write(one, args.rows, args.classes)
        write(ten, 10 * args.rows, args.classes)
        stream_t, first_t, direct_t, decoder_t = [], [], [], []
        for _ in range(args.repeats):  # alternated, so drift on this shared machine hits both
            direct_t.append(direct_epoch(one)[1])
            decoder_t.append(decoder_epoch(one)[1])
            ts = stream_epochs(one, 3)
            first_t.append(ts[0])
            stream_t += ts[1:]
        stream_t, first_t, direct_t, decoder_t = min(stream_t), min(first_t), min(direct_t), min(decoder_t)
        m1, m10 = peak(one), peak(ten)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    grow1, grow10 = m1["peak_kib"] - m1["before_kib"], m10["peak_kib"] - m10["before_kib"]
    res = {"rows_1x": args.rows, "classes": args.classes,
           "stream_rows_per_s": args.rows / stream_t, "direct_rows_per_s": args.rows / direct_t,
           "throughput_vs_direct": direct_t / stream_t, "first_epoch_vs_direct": direct_t / first_t,
           "throughput_vs_own_decoder": decoder_t / stream_t,
           "peak_mib_1x": m1["peak_kib"] / 1024, "peak_mib_10x": m10["peak_kib"] / 1024,
           "growth_mib_1x": grow1 / 1024, "growth_mib_10x": grow10 / 1024,
           "peak_mem_10x_vs_1x": m10["peak_kib"] / m1["peak_kib"]}
    print(f"stream {res['stream_rows_per_s']:.0f} rows/s, direct {res['direct_rows_per_s']:.0f} rows/s "
          f"(x{res['throughput_vs_direct']:.2f}); peak {res['peak_mib_1x']:.0f} MiB at 1x, "
          f"{res['peak_mib_10x']:.0f} MiB at 10x (growth while streaming {res['growth_mib_1x']:.0f} / "
          f"{res['growth_mib_10x']:.0f} MiB)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
