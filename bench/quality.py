"""Does distillation pay on corpora nobody tuned it on? Distilled students against their
labels-only twins, over several corpora and both kinds of student.

For each corpus (the built-in Shakespeare and those of ``bench/corpora.py``: the standard
library's Python source, Debian's manual pages, licence texts), one teacher pass (stage 1,
SmolLM2-135M, top-64 + 16 draws a token, as ``task=lm`` captures), then for each kind of
student (``scratch``: the 2-layer ``causal_lm`` at task=lm's defaults; ``layers``: the
teacher's own layers 0, 6, 12, 18, 24, 29 at lr 3e-3 with 24 warm-up steps, the README's
recipe) the labels-only twin and each objective, at every seed: the same initialisation,
the same batches in the same order and the same steps for all of them (``train.seed``), so
a ratio to the twin is paired by seed. Every corpus is cut to the same size: 480 training
and 48 held-out sequences of 128 teacher tokens.

Results are data: every finished run is kept in ``<root>/quality.json`` (a rerun skips it:
resumable, and a partial run is a fair one, since it goes seed by seed over every cell),
and the whole state with the commit, the machine and the command goes to
``bench/results/quality.json``; the plot to ``docs/quality.png``. The JSON last line holds
``distilled_vs_labels``: per corpus and kind, the best objective's held-out perplexity over
its twin's (the seed-paired mean, its sd and the seeds), with the goals (0.90 for the
teacher-layer student, 0.95 from scratch) and whether each is met.

    .venv/bin/python bench/quality.py                        # everything, 3 seeds (hours on 2 cores)
    .venv/bin/python bench/quality.py --corpora python --kinds scratch --seeds 1
    .venv/bin/python bench/quality.py --objectives topk_kl:64 sampled_kl loss.temperature=2.0
    .venv/bin/python bench/quality.py --report              # the runs so far (another may be running)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import corpora
import numpy as np
from runs import cli, complete, mean_sd, open_state, paired, save, train

ROOT_DEFAULT = "data/quality"
SIZES = ["data.train_size=480", "data.test_size=48", "data.seq_len=128"]
KINDS = {
    "scratch": [],
    "layers": ["student=teacher_layers", "train.lr=0.003", "train.warmup_steps=24"],
}
GOALS = {"scratch": 0.95, "layers": 0.90}
OBJECTIVES = ["topk_kl:64", "sampled_kl", "skew_kl_topk", "akl_topk", "taid_topk"]
CORPORA = ["shakespeare", *corpora.CORPORA]


def corpus_settings(root: str, name: str) -> list[str]:
    """The data.* settings of corpus ``name`` (built on first use under ``<root>/corpora``)."""
    if name == "shakespeare":
        return ["data=shakespeare", *SIZES]
    path = os.path.join(root, "corpora", f"{name}.jsonl")
    if not os.path.exists(path):
        print(f"building corpus {name}: {corpora.build(name, path)}", file=sys.stderr)
    return ["data=corpus", f"data.path={path}", f"data.name={name}", *SIZES]


def cache_stats(path: str) -> dict:
    """What the teacher's cached rows say about a corpus (at T=1, every row): the mass its
    top-K leaves to the tail bucket and its top-1 probability (mean and median), and the
    entropy of its softmax (the sampled rows' cached entropy): how much of the teacher a top-K
    student sees, and how sure the teacher is."""
    import dask.array as da

    from pipeline.cache import open_cache
    from pipeline.cache.format import LSE, SAMPLED_ENT, TOPK_VAL

    r = open_cache(path)
    lse = r.arrays[LSE][:, r.manifest.temperatures.index(1.0)].astype("f8")
    val = r.arrays[TOPK_VAL].astype("f8")
    tail = (1 - da.exp(val - lse[:, None]).sum(axis=1)).clip(0, 1)
    top1 = da.exp(val[:, 0] - lse)
    ent = r.arrays[SAMPLED_ENT].astype("f8") if SAMPLED_ENT in r.arrays else None
    tail, top1, ent = da.compute(tail, top1, ent)
    out = {"rows": int(len(tail)), "k": int(val.shape[1]), "tail_mass_mean": float(tail.mean()),
           "tail_mass_median": float(np.median(tail)), "top1_mean": float(top1.mean()),
           "top1_median": float(np.median(top1))}
    if ent is not None:
        out["entropy_mean"] = float(ent.mean())
    return out


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary(state: dict) -> dict:
    """Per corpus, kind and objective: the seed-paired ratio of held-out perplexity to the
    labels-only twin; per corpus and kind, the best objective's."""
    out: dict = {}
    for corpus, kinds in state["runs"].items():
        for kind, variants in kinds.items():
            twin = variants.get("labels", {})
            cells = {}
            for name, runs in variants.items():
                if not runs:
                    continue
                ppl, sd = mean_sd([r["ppl"] for r in runs.values()])
                cells[name] = {"ppl": ppl, "sd": sd, "n": len(runs),
                               "kl": sum(r["kl"] for r in runs.values()) / len(runs)}
                by_seed = paired(runs, twin) if name != "labels" else None
                if by_seed:
                    cells[name] |= {"vs_labels": by_seed[0], "vs_labels_sd": by_seed[1], "paired_seeds": by_seed[2]}
                if name != "labels" and twin:
                    for key in ("by_confidence", "by_target_in_topk"):
                        cells[name][f"nll_change_{key}"] = nll_change(runs, twin, key)
            ranked = [n for n in cells if "vs_labels" in cells[n]]
            best = min(ranked, key=lambda n: cells[n]["vs_labels"]) if ranked else None
            out.setdefault(corpus, {})[kind] = {"cells": cells, "best": best}
    return out


def nll_change(runs: dict, twin: dict, key: str) -> dict:
    """Per group of held-out positions (``key``: by_confidence, the bins of the teacher's
    top-1 probability; by_target_in_topk, the next token inside or outside the cached top-K):
    the mean over shared seeds of the distilled student's NLL there minus its twin's (nats a
    token; negative: distillation helped there), and the group's share of the positions."""
    out = {}
    seeds = [s for s in runs if s in twin and runs[s].get(key) and twin[s].get(key)]
    for b in (runs[seeds[0]][key] if seeds else {}):
        d = [runs[s][key][b]["nll"] - twin[s][key][b]["nll"] for s in seeds
             if runs[s][key][b]["nll"] is not None and twin[s][key][b]["nll"] is not None]
        n = twin[seeds[0]][key][b]["tokens"]
        total = sum(v["tokens"] for v in twin[seeds[0]][key].values())
        out[b] = {"share": n / total, "delta_nll": sum(d) / len(d) if d else None}
    return out


def verdict(s: dict) -> dict:
    table = {}
    for corpus, kinds in s.items():
        for kind, k in kinds.items():
            if k["best"] is None:
                continue
            b = k["cells"][k["best"]]
            table.setdefault(corpus, {})[kind] = {
                "best": k["best"], "ratio": round(b["vs_labels"], 4),
                "sd": None if b["vs_labels_sd"] != b["vs_labels_sd"] else round(b["vs_labels_sd"], 4),
                "seeds": b["paired_seeds"], "goal": GOALS[kind], "met": b["vs_labels"] <= GOALS[kind]}
    return table


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(k in v for v in s.values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        names = sorted({n for v in s.values() for n in v.get(kind, {}).get("cells", {}) if n != "labels"})
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs, ys, es = [], [], []
            for j, corpus in enumerate(s):
                c = s[corpus].get(kind, {}).get("cells", {}).get(name)
                if c and "vs_labels" in c:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(c["vs_labels"])
                    es.append(0 if c["vs_labels_sd"] != c["vs_labels_sd"] else c["vs_labels_sd"])
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(GOALS[kind], color="red", lw=0.8, ls="--", label=f"goal {GOALS[kind]}")
        ax.set_xticks(range(len(s)), list(s))
        ax.set_ylim(min(0.8, ax.get_ylim()[0]), max(1.05, ax.get_ylim()[1]))
        ax.set_ylabel("held-out perplexity / labels-only twin's")
        ax.set_title(f"{kind} students (seed-paired mean, sd)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT_DEFAULT)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--corpora", nargs="*", default=CORPORA, choices=CORPORA)
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--objectives", nargs="*", default=OBJECTIVES, help="lm.variants entries besides labels")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default: torch's)")
    ap.add_argument("--report", action="store_true", help="report the runs kept under --root; run nothing")
    ap.add_argument("--results", default="bench/results/quality.json")
    ap.add_argument("--plot", default="docs/quality.png")
    ap.add_argument("overrides", nargs="*", help="settings for every student (loss.temperature=2.0); a root holds "
                    "runs of one set of them")
    args = ap.parse_args()
    root, state_path, state = open_state(args.root, "quality.json", {"runs": {}, "caches": {}}, args.overrides)
    variants = ["labels", *args.objectives]

    def cache_of(corpus: str) -> tuple[str, list[str]]:
        data = corpus_settings(root, corpus)
        path = os.path.join(root, "caches", corpus)
        if not complete(path):  # (stage 1 resumes a capture killed part way)
            print(f"stage 1: {corpus}", file=sys.stderr)
            t0 = time.perf_counter()
            cli("stage=1", f"paths.root={root}", f"cache.path={path}", *data,
                f"hydra.run.dir={os.path.join(root, 'runs', 'capture-' + corpus)}", threads=args.threads)
            state["caches"][corpus] = {"seconds": time.perf_counter() - t0}
            save(state_path, state)
        if "tail_mass_mean" not in state["caches"].get(corpus, {}):
            state["caches"].setdefault(corpus, {}).update(cache_stats(path))
            save(state_path, state)
        return path, data

    # seed by seed over every cell (a partial run is a fair one), the cheaper kind first
    for seed in range(0 if args.report else args.seeds):
        for kind in args.kinds:
            for corpus in args.corpora:
                cache, data = cache_of(corpus)
                for variant in variants:
                    runs = state["runs"].setdefault(corpus, {}).setdefault(kind, {}).setdefault(variant, {})
                    if str(seed) in runs:
                        continue
                    print(f"stage 3: {corpus} {kind} {variant} seed {seed}", file=sys.stderr)
                    run_dir = os.path.join(root, "runs", f"{corpus}-{kind}-{variant.replace(':', '')}-s{seed}")
                    runs[str(seed)] = train(root, run_dir, cache, variant, seed, [*data, *KINDS[kind],
                                                                                  *args.overrides], args.threads)
                    save(state_path, state)

    for corpus in (c for c in args.corpora if complete(os.path.join(root, "caches", c))):
        c = state["caches"].setdefault(corpus, {})
        if "tail_mass_mean" not in c:
            c.update(cache_stats(os.path.join(root, "caches", corpus)))
        print(f"{corpus:12s} teacher rows {c['rows']}: top-{c['k']} leaves {100 * c['tail_mass_mean']:.1f}% of the mass "
              f"to the tail (median {100 * c['tail_mass_median']:.1f}%), top-1 probability {c['top1_mean']:.3f} "
              f"(median {c['top1_median']:.3f}), entropy {c.get('entropy_mean', float('nan')):.2f} nats")
    s = summary(state)
    print(f"{'corpus':12s} {'student':8s} {'trained on':14s} {'seeds':>5s} {'perplexity':>18s} {'KL':>7s} "
          f"{'vs labels, paired':>20s}")
    for corpus, kinds in s.items():
        for kind, k in kinds.items():
            for name, c in k["cells"].items():
                spread = f" +- {c['sd']:.2f}" if c["n"] > 1 else ""
                vs = (f"{c['vs_labels']:.3f} +- {c['vs_labels_sd']:.3f}" if c.get("paired_seeds", 0) > 1 else
                      f"{c['vs_labels']:.3f}" if "vs_labels" in c else "")
                print(f"{corpus:12s} {kind:8s} {name:14s} {c['n']:5d} {c['ppl']:9.2f}{spread:9s} {c['kl']:7.3f} "
                      f"{vs:>20s}")
    for key, what in (("by_confidence", "the teacher's top-1 probability at the position"),
                      ("by_target_in_topk", "whether the next token is in the cached top-K")):
        print(f"\nheld-out NLL change against the labels-only twin (nats a token, seed mean) by {what} "
              "(share of positions):")
        for corpus, kinds in s.items():
            for kind, k in kinds.items():
                for name, c in k["cells"].items():
                    if c.get(f"nll_change_{key}"):
                        print(f"{corpus:12s} {kind:8s} {name:14s} " + "  ".join(
                            f"{b}: {v['delta_nll']:+.3f} ({100 * v['share']:.0f}%)"
                            for b, v in c[f"nll_change_{key}"].items() if v["delta_nll"] is not None))
    v = verdict(s)
    import torch

    from pipeline.device import machine

    record = {"commit": commit(), "machine": machine() | {"threads": args.threads or torch.get_num_threads()},
              "command": " ".join([sys.executable, *sys.argv]), "state": state, "summary": s,
              "distilled_vs_labels": v}
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    save(args.results, record)
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    plot(s, args.plot)
    print(json.dumps({"distilled_vs_labels": v, "all_met": bool(v) and all(c["met"] for k in v.values()
                                                                             for c in k.values())}))


if __name__ == "__main__":
    main()
