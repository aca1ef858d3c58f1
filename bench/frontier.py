"""The bytes-per-token frontier of task=lm's cache representations.

One wide teacher pass (stage 1: top-128 float16 + 64 draws per token, SmolLM2-135M on the
built-in Shakespeare), then every representation derived from it by stage 2 (no teacher
again), then the same student trained from each by stage 3: same initialisation, batches,
steps (task=lm's default 240 x 4 sequences), only the cache differs. Held-out perplexity
and KL(teacher || student) over the parent's top-128 + tail (``lm.eval_cache``: one
yardstick for all). ``--seeds`` seeds (student initialisation and batch order) for every
representation: one seed moves a student's perplexity by up to 10% here. Bytes per token: in the format (the arrays' bytes per row before compression,
ids excluded) and on disk (the arrays' stored bytes, ids included, over the rows; the
fixed files beside them, chiefly the teacher's 2 MB tokenizer.json, are left out: on a
67k-token corpus they would add 31 B/token that a billion-token corpus does not pay).

Prints a table, writes ``docs/frontier.png`` (perplexity against bytes per token on disk,
log x) and, last, a JSON line with ``best_le_50B_ppl_ratio`` (the best representation at
<= 50 B/token on disk over plain top-64 float16, seed means) and
``beats_topk_fp16_at_every_budget`` (at each plain top-k float16 point, the best of the
others no larger on disk is at or below its perplexity, seed means).

Resumable: every finished run is kept in ``<root>/frontier.json``; a rerun skips it.

    python bench/frontier.py                 # about 75 minutes on 2 cores
    python bench/frontier.py --seeds 1       # seed 0 only
    python bench/frontier.py --root data/frontier-lr1e-3 train.lr=0.001   # students at another setting
                                             # (the wide capture is reused from the same --root only)
    python bench/frontier.py --root data/frontier-2000 --seeds 1 --plot docs/frontier-2000.png \
        train.lr=0.001 data.train_size=2000 --only topk64-fp16 sampled32-narrow   # a 4x larger corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from runs import cli, complete, mean_sd, open_state, paired, save, train

ROOT_DEFAULT = "data/frontier"
PARENT = dict(k=128, samples=64)
# name -> (stage-2 derive overrides, stage-3 variant, family)
REPRESENTATIONS = {
    "topk8-fp16": (["derive.mode=topk", "derive.k=8"], "topk_kl", "top-k fp16"),
    "topk32-fp16": (["derive.mode=topk", "derive.k=32"], "topk_kl", "top-k fp16"),
    "topk64-fp16": (["derive.mode=topk", "derive.k=64"], "topk_kl", "top-k fp16"),
    "topk16-q8-narrow": (["derive.mode=topk", "derive.k=16", "derive.value_bits=8", "derive.narrow=true"], "topk_kl",
                         "top-k 8-bit narrow"),
    "topk64-q8-narrow": (["derive.mode=topk", "derive.k=64", "derive.value_bits=8", "derive.narrow=true"], "topk_kl",
                         "top-k 8-bit narrow"),
    "topk128-p0.8-q8-narrow": (["derive.mode=topk", "derive.k=128", "derive.top_p=0.8", "derive.value_bits=8",
                                "derive.narrow=true"], "topk_kl", "adaptive top-k 8-bit narrow"),
    "sampled1-narrow": (["derive.mode=sampled", "derive.samples=1", "derive.narrow=true"], "sampled_kl",
                        "sampled narrow"),
    "sampled4-narrow": (["derive.mode=sampled", "derive.samples=4", "derive.narrow=true"], "sampled_kl",
                        "sampled narrow"),
    "sampled16-narrow": (["derive.mode=sampled", "derive.samples=16", "derive.narrow=true"], "sampled_kl",
                         "sampled narrow"),
    "sampled32-narrow": (["derive.mode=sampled", "derive.samples=32", "derive.narrow=true"], "sampled_kl",
                         "sampled narrow"),
    "sampled64-narrow": (["derive.mode=sampled", "derive.samples=64", "derive.narrow=true"], "sampled_kl",
                         "sampled narrow"),
}
REFERENCE = "topk64-fp16"
BUDGET = 50.0  # bytes per token on disk


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cache_sizes(path: str) -> dict:
    from pipeline.cache import open_cache
    from pipeline.cache.format import row_bytes

    m = open_cache(path).manifest
    arrays = sum(folder_bytes(os.path.join(path, d)) for d in ("zarr", "shards") if os.path.isdir(os.path.join(path, d)))
    # on disk: the arrays (ids included) per token; the index files beside them (the teacher's
    # tokenizer.json, 2 MB for SmolLM2; offsets; the manifest) are a fixed cost per cache, not per token
    out = {"format": row_bytes(m), "disk": arrays / m.rows, "fixed": folder_bytes(path) - arrays, "rows": m.rows}
    if m.top_p:  # the entries an adaptive row holds, on average
        idx = open_cache(path).arrays["topk_idx"]
        out["mean_k"] = float((idx >= 0).sum(axis=1).mean().compute())
    return out


def summary(state: dict) -> dict[str, dict]:
    out = {}
    for name, runs in state["runs"].items():
        ppl = [r["ppl"] for r in runs.values()]
        kl = [r["kl"] for r in runs.values()]
        mean, sd = mean_sd(ppl)
        out[name] = {"ppl": mean, "sd": sd, "n": len(ppl), "kl": sum(kl) / len(kl), **state["sizes"][name],
                     "family": REPRESENTATIONS[name][2] if name in REPRESENTATIONS else name}
        by_seed = paired(runs, state["runs"].get(REFERENCE, {}))  # against the reference cache
        if by_seed:
            out[name] |= {"paired": by_seed[0], "paired_sd": by_seed[1]}
    return out


def verdict(s: dict[str, dict]) -> dict:
    ref = s[REFERENCE]["ppl"]
    small = [n for n in s if s[n]["disk"] <= BUDGET]
    best_small = min(small, key=lambda n: s[n]["ppl"]) if small else None
    beats = {}
    for n in (n for n in s if s[n]["family"] == "top-k fp16"):
        others = [o for o in s if s[o]["family"] != "top-k fp16" and s[o]["disk"] <= s[n]["disk"]]
        best = min(others, key=lambda o: s[o]["ppl"]) if others else None
        beats[n] = {"best_other": best, "ok": best is not None and s[best]["ppl"] <= s[n]["ppl"]}
    return {"best_le_50B": best_small, "best_le_50B_ppl_ratio": s[best_small]["ppl"] / ref if best_small else None,
            "beats_topk_fp16_at_every_budget": all(b["ok"] for b in beats.values()), "per_budget": beats}


def plot(s: dict[str, dict], path: str, settings: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam in dict.fromkeys(v["family"] for v in s.values()):
        names = sorted((n for n in s if s[n]["family"] == fam), key=lambda n: s[n]["disk"])
        xs, ys = [s[n]["disk"] for n in names], [s[n]["ppl"] for n in names]
        err = [s[n]["sd"] if s[n]["n"] > 1 else 0 for n in names]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam)
    ax.axvline(BUDGET, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per token on disk (log)")
    ax.set_ylabel("student held-out perplexity")
    seeds = max(v["n"] for v in s.values())
    ax.set_title(f"task=lm{''.join(' ' + o for o in settings)}: student perplexity vs cache size "
                 f"({seeds} seeds: mean, sd)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT_DEFAULT)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="representations to run (default: all)")
    ap.add_argument("--plot", default="docs/frontier.png")
    ap.add_argument("overrides", nargs="*", help="settings for every student (train.lr=0.001; before --only); data.* "
                    "ones also go to stages 1 and 2 (data.train_size=2000: a larger corpus)")
    args = ap.parse_args()
    root, state_path, state = open_state(args.root, "frontier.json", {"sizes": {}, "runs": {}}, args.overrides)
    parent = os.path.join(root, "caches", "parent")
    corpus = [o for o in args.overrides if o.startswith("data.")]
    wide = (f"cache.k={PARENT['k']}", f"cache.samples={PARENT['samples']}")
    if not complete(parent):
        print("stage 1: the wide parent cache", file=sys.stderr)
        cli("stage=1", f"paths.root={root}", f"cache.path={parent}", *wide, *corpus)
    names = args.only or list(REPRESENTATIONS)
    for name in names:
        derive, _, _ = REPRESENTATIONS[name]
        path = os.path.join(root, "caches", name)
        if not complete(path):
            print(f"stage 2: derive {name}", file=sys.stderr)
            cli("stage=2", f"paths.root={root}", f"cache.path={parent}", *wide, *corpus, f"derive.path={path}", *derive,
                f"hydra.run.dir={os.path.join(root, 'runs', 'derive-' + name)}")
        state["sizes"][name] = cache_sizes(path)
    save(state_path, state)

    def run(name: str, seed: int) -> None:
        runs = state["runs"].setdefault(name, {})
        if str(seed) in runs:
            return
        print(f"stage 3: {name} seed {seed}", file=sys.stderr)
        runs[str(seed)] = train(root, os.path.join(root, "runs", f"{name}-s{seed}"), os.path.join(root, "caches", name),
                                REPRESENTATIONS[name][1], seed, [f"lm.eval_cache={parent}", *args.overrides])
        save(state_path, state)

    for seed in range(args.seeds):  # every representation, seed by seed (a partial run is a fair one)
        for name in names:
            run(name, seed)
    s = summary(state)

    print(f"{'representation':26s} {'B/token format':>14s} {'on disk':>8s} {'seeds':>5s} {'perplexity':>18s} "
          f"{'KL to teacher':>13s} {'vs top-64 fp16':>14s} {'paired by seed':>16s}")
    ref = s[REFERENCE]["ppl"]
    for name in sorted(s, key=lambda n: s[n]["disk"]):
        r = s[name]
        spread = f" +- {r['sd']:.2f}" if r["n"] > 1 else ""
        kk = f" (mean k {r['mean_k']:.1f})" if "mean_k" in r else ""
        print(f"{name + kk:26s} {r['format']:14d} {r['disk']:8.1f} {r['n']:5d} {r['ppl']:9.2f}{spread:9s} "
              f"{r['kl']:13.4f} {100 * (r['ppl'] / ref - 1):+13.1f}% "
              + (f"{100 * (r['paired'] - 1):+7.2f}% +- {100 * r['paired_sd']:.2f}" if "paired" in r else ""))
    v = verdict(s)
    for n, b in v["per_budget"].items():
        print(f"  at {s[n]['disk']:.1f} B/token ({n}, {s[n]['ppl']:.2f}): best other no larger: {b['best_other']} "
              f"({s[b['best_other']]['ppl']:.2f})" if b["best_other"] else f"  at {n}: nothing smaller")
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    plot(s, args.plot, args.overrides)
    print(json.dumps({"best_le_50B": v["best_le_50B"], "best_le_50B_ppl_ratio": v["best_le_50B_ppl_ratio"],
                      "beats_topk_fp16_at_every_budget": v["beats_topk_fp16_at_every_budget"],
                      "seeds": {n: s[n]["n"] for n in s}}))


if __name__ == "__main__":
    main()
