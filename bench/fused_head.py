"""The fused output head + objective (pipeline/fused_head.py) against the unfused path.

One forward + backward of a causal LM's output head and stage 3's objective, alpha * CE +
lam * top-K KL (K = 64 + tail), at vocabulary 49,152 and hidden 576 (SmolLM2-135M's
shapes), for 8,192 and 32,768 rows: the unfused path materialises every row's float32
logits, then the cross-entropy and the kernel; the fused one goes chunk by chunk. Each
measurement runs in a fresh process: peak memory is that process's peak RSS over its RSS
before the step (the inputs already allocated); time is the step's wall time, best of
``--repeats``, fused and unfused alternating. Where the unfused step would not fit in the
memory available (estimated before running it), it is not run and says so.

    python bench/fused_head.py [--rows 8192 32768] [--chunk 1024] [--repeats 2]

Last line: JSON with ``peak_mem_ratio`` and ``time_ratio`` (fused / unfused) at the largest
row count both ran, and every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

V, HIDDEN, K = 49152, 576, 64


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(path: str, rows: int, chunk: int) -> dict:
    """In this process: build the inputs, then time one forward + backward and its peak RSS."""
    from pipeline.run import set_environment_defaults

    set_environment_defaults()
    import numpy as np
    import torch

    from pipeline.config import Distance, LossConfig
    from pipeline.fused_head import head_loss
    from pipeline.losses import teacher_term

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(V, HIDDEN, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (rows,), generator=g)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(V, K, replace=False) for _ in range(min(rows, 256))]).astype(np.int32)
    idx = np.resize(idx, (rows, K))
    val = np.sort(rng.standard_normal((rows, K)).astype(np.float32) * 2 + 10, axis=1)[:, ::-1].copy()
    teacher = {"topk_idx": idx, "topk_val": val, "lse": np.full(rows, 12.0, np.float32)}
    mask = np.ones(rows, bool)
    cfg = LossConfig(distance=Distance.topk_kl, alpha=1.0, lam=1.0, temperature=1.0)
    before = rss_mb()
    t0 = time.perf_counter()
    if path == "fused":
        loss = head_loss(hidden, weight, None, labels, teacher, cfg, teacher_mask=mask, chunk_rows=chunk)
    else:
        logits = hidden @ weight.T
        loss = torch.nn.functional.cross_entropy(logits, labels) + teacher_term(logits, teacher, cfg, mask=mask)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "rows": rows, "seconds": seconds, "peak_mb": peak - before, "loss": float(loss)}


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.chunk)))
        return
    results = {}
    for rows in args.rows:
        # the unfused step holds about four (rows x V) float32 buffers at its peak (logits, the
        # cross-entropy's log-softmax, the kernel's gradient, the summed gradient)
        need = 4 * rows * V * 4 / 2**20
        runs = {"fused": [], "unfused": []}
        skip = need > 0.85 * available_mb()
        for _ in range(args.repeats):
            for path in ("fused", "unfused"):
                if path == "unfused" and skip:
                    continue
                env = dict(os.environ, OMP_WAIT_POLICY="passive")
                proc = subprocess.run([sys.executable, __file__, "--one", path, str(rows), "--chunk", str(args.chunk)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    runs[path].append({"error": proc.stderr[-500:]})
                    continue
                runs[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        best = {p: min((r for r in rs if "seconds" in r), key=lambda r: r["seconds"], default=None)
                for p, rs in runs.items()}
        f, u = best["fused"], best["unfused"]
        results[rows] = {"fused": f, "unfused": u,
                         "unfused_skipped": f"needs about {need:.0f} MB, {available_mb():.0f} available" if skip else None}
        line = f"rows {rows}: fused {f['seconds']:.2f}s peak +{f['peak_mb']:.0f} MB"
        if u:
            line += (f"; unfused {u['seconds']:.2f}s peak +{u['peak_mb']:.0f} MB; memory x{f['peak_mb'] / u['peak_mb']:.3f}"
                     f", time x{f['seconds'] / u['seconds']:.3f}; loss {f['loss']:.6f} vs {u['loss']:.6f}")
        else:
            line += f"; unfused not run ({results[rows]['unfused_skipped']})"
        print(line, flush=True)
    both = [r for r in args.rows if results[r]["unfused"]]
    at = max(both) if both else None
    out = {"rows_compared": at, "chunk": args.chunk,
           "peak_mem_ratio": results[at]["fused"]["peak_mb"] / results[at]["unfused"]["peak_mb"] if at else None,
           "time_ratio": results[at]["fused"]["seconds"] / results[at]["unfused"]["seconds"] if at else None,
           "results": {str(k): v for k, v in results.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
