"""Student accuracy against transfer-set size: one cache per size (10k, 100k, 1M unlabeled
MNIST-1D samples labeled by the same teacher), the same MLP distilled from each for about
the same number of optimizer steps (~8,000), and its labels-only baseline.

    .venv/bin/python bench/transfer_size.py [--root data/transfer-study] [--sizes 10000 100000 1000000]

Runs the real CLI once per size; writes docs/transfer_size.png and prints a markdown table
and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys

STEPS = 8140  # 20 epochs over the default 104,000 rows at batch 256


def run(root: str, size: int) -> dict:
    rows = size + 4000
    epochs = max(1, round(STEPS / math.ceil(rows / 256)))
    cmd = [sys.executable, "-m", "pipeline.run", f"paths.root={root}/{size}", f"data.transfer_size={size}",
           "student=mlp", f"train.epochs={epochs}"]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_WAIT_POLICY="passive"), stdout=subprocess.DEVNULL)
    (res,) = sorted(glob.glob(f"{root}/{size}/runs/*/results.json"))[-1:]
    (row,) = json.load(open(res))["students"]
    return {"transfer_size": size, "epochs": epochs, **{k: row[k] for k in
            ("test_acc", "labels_only_acc", "teacher_acc", "agreement", "steps")}}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["transfer_size"] for r in rows]
    ax.plot(x, [r["test_acc"] for r in rows], "o-", label="MLP distilled through the transfer set")
    ax.plot(x, [r["labels_only_acc"] for r in rows], "x--", c="gray", label="same MLP, 4,000 labels only")
    ax.axhline(rows[0]["teacher_acc"], color="k", ls=":", label="teacher (CNN)")
    ax.set_ylim(top=rows[0]["teacher_acc"] + 0.03)
    ax.set(xscale="log", xlabel="unlabeled transfer samples (cached teacher logits)", ylabel="test accuracy",
           title="MNIST-1D: what a cached teacher buys")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="data/transfer-study")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    rows = [run(args.root, s) for s in args.sizes]
    os.makedirs("docs", exist_ok=True)
    plot(rows, "docs/transfer_size.png")
    print("| transfer samples | epochs | optimizer steps | distilled MLP | labels-only MLP | teacher |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['transfer_size']:,} | {r['epochs']} | {r['steps']:,} | {r['test_acc']:.4f} | "
              f"{r['labels_only_acc']:.4f} | {r['teacher_acc']:.4f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
