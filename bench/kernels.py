"""Distance kernels: forward + backward of each Numba kernel (through the autograd bridge,
as stage 3 calls it) against the plain torch implementation of the same loss, side by side
in one run, 2 threads each, plus the memory-copy bandwidth measured in the same run: every
distance of the registry with a kernel, dense, over the top-K (K=64) or over 32 draws a row.

    .venv/bin/python bench/kernels.py [--quick]

The last line is one JSON object: {"speedup": {distance: {"BxC": ratio}}, "bandwidth_fraction":
{distance: {"BxC": fraction}}, ...}. speedup = torch time / Numba time (higher is better);
bandwidth_fraction = bytes the kernel must move (read student and teacher, write the
gradient) / its time / the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
import torch

from pipeline import losses
from pipeline.device import machine
from pipeline.distances import distance_spec
from pipeline.kernels import DENSE, SPARSE
from pipeline.losses import distance_loss, distance_term, torch_distance

SIZES = [(4096, 10), (4096, 1000), (512, 32000), (64, 128000)]


def best_time(fn, repeats: int, min_seconds: float = 0.2) -> float:
    fn()  # warm-up (and Numba compilation)
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 > min_seconds:
                break
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def copy_bandwidth(repeats: int) -> float:
    src = np.random.default_rng(0).standard_normal(32 << 20 >> 3)  # 32 MiB
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: np.copyto(dst, src), repeats)  # read + write


def side_by_side(s: torch.Tensor, numba_loss, torch_rows, repeats: int) -> tuple[float, float]:
    """Best times of forward + backward: the Numba kernel's loss through the autograd bridge,
    and the torch rows' mean, both from the same student logits ``s``."""

    def numba_step():
        s.grad = None
        numba_loss(s).backward()

    def torch_step():
        s.grad = None
        torch_rows(s).mean().backward()

    return best_time(numba_step, repeats), best_time(torch_step, repeats)


def logits(b: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (B, C) student logits (requiring grad) and teacher logits, both N(0, 3^2)."""
    rng = np.random.default_rng(b + c)
    s = torch.tensor(rng.standard_normal((b, c), dtype=np.float32) * 3, requires_grad=True)
    return s, torch.tensor(rng.standard_normal((b, c), dtype=np.float32) * 3)


def bench_dense(name: str, b: int, c: int, repeats: int) -> tuple[float, float]:
    s, t = logits(b, c)
    return side_by_side(s, lambda x: distance_loss(name, x, t, temperature=2.0),
                        lambda x: torch_distance(name, x, t, 2.0), repeats)


def bench_topk(name: str, b: int, c: int, repeats: int) -> tuple[float, float]:
    """A distance over the top-K (K=64) and the exact logsumexp at T=2."""
    k = min(64, c)
    s, full = logits(b, c)
    val, idx = torch.topk(full, k)
    lse = torch.logsumexp(full / 2.0, -1)
    return side_by_side(s, lambda x: distance_term(name, x, (idx, val, lse), temperature=2.0),
                        lambda x: torch_rows(name, x, idx, val, lse), repeats)


def bench_sampled(name: str, b: int, c: int, repeats: int) -> tuple[float, float]:
    """A distance over 32 draws a row from the teacher's softmax at T=2 (distinct ids with
    their counts, as the cache holds them; unused slots -1 with count 0)."""
    n = min(32, c)
    s, t = logits(b, c)
    p = torch.softmax(t / 2.0, -1)
    draws = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    ids, counts = np.full((b, n), -1, np.int32), np.zeros((b, n), np.uint16)
    for i, row in enumerate(draws.numpy()):
        u, k = np.unique(row, return_counts=True)
        ids[i, :len(u)], counts[i, :len(u)] = u, k
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    idx, cnt = torch.from_numpy(ids), torch.from_numpy(counts.astype(np.int32))
    return side_by_side(s, lambda x: distance_term(name, x, (ids, counts, entropy), temperature=2.0),
                        lambda x: torch_rows(name, x, idx, cnt, entropy), repeats)


def torch_rows(name: str, s: torch.Tensor, *arrays) -> torch.Tensor:
    """The distance's torch rows (its declaration's reference) at T=2 and its own beta."""
    spec = distance_spec(name)
    return getattr(losses, spec.reference)(s, *arrays, 2.0, spec.beta_of(None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    bw = copy_bandwidth(repeats)
    speedup: dict = {}
    fraction: dict = {}
    for b, c in SIZES:
        key = f"{b}x{c}"
        for name in DENSE:
            t_nb, t_torch = bench_dense(name, b, c, repeats)
            speedup.setdefault(name, {})[key] = t_torch / t_nb
            if name in ("mse", "cosine", "euclidean"):
                fraction.setdefault(name, {})[key] = 3 * b * c * 4 / t_nb / bw
            print(f"{name:11s} {key:10s} numba {t_nb * 1e3:8.3f} ms  torch {t_torch * 1e3:8.3f} ms  "
                  f"x{t_torch / t_nb:5.2f}", flush=True)
        for name in SPARSE:  # every distance over the top-K or the draws with a kernel
            t_nb, t_torch = (bench_topk if distance_spec(name).reads == "topk" else bench_sampled)(name, b, c, repeats)
            speedup.setdefault(name, {})[key] = t_torch / t_nb
            print(f"{name:11s} {key:10s} numba {t_nb * 1e3:8.3f} ms  torch {t_torch * 1e3:8.3f} ms  "
                  f"x{t_torch / t_nb:5.2f}", flush=True)
    out = {"speedup": {k: {s: round(v, 3) for s, v in d.items()} for k, d in speedup.items()},
           "bandwidth_fraction": {k: {s: round(v, 3) for s, v in d.items()} for k, d in fraction.items()},
           "copy_gbps": round(bw / 1e9, 2), "threads": 2, "machine": machine()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
