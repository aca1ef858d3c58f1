"""Which representation to derive from a cache for a budget in bytes per token.

Stage 2 with ``cache.budget_bytes_per_token=B`` reads the audit it has just made of a
(wide) cache and lists what that cache can derive, each with its expected storage, then
picks one: ``derive.mode=auto`` derives it. The expected storage is each row's occupied
entries at their stored sizes: fixed-width arrays at their width; an adaptive top-k row
at the mean entries it keeps at ``top_p`` (the audit's ``adaptive_k``); a sampled row at
the distinct ids expected among its draws (``expected_distinct``), since zstd stores the
padding in next to nothing. zstd takes some more off the ids and codes, so the
expectation is close to an upper bound of the arrays' bytes on disk (bench/frontier.py
prints both).

The pick follows :data:`PREFERENCE`: the first family with a member within the budget,
its largest such member. The order was set from bench/frontier.py on task=lm (README, "The
bytes-per-token frontier", 3 seeds at train.lr=1e-3, compared seed by seed): at every size
the sampled caches trained the best student and came closest to the teacher in KL (3-5%
lower perplexity than top-k of the same size at 26-50 B/token; 32 draws within 0.2% of
top-64 float16 at a sixth of its size); 8-bit top-k values cost nothing measurable against
float16 (+0.2% +- 0.4% at K=64); adaptive rows matched top-64 8-bit at about its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.cache.format import NARROW_PAD, Manifest

# families, preferred first (see the module's docstring)
PREFERENCE = ("sampled", "topk-q8", "topk-adaptive-q8", "topk-q4", "topk-fp16")


@dataclass
class Candidate:
    family: str
    size: float  # K, draws or top_p
    settings: dict  # the derive.* settings that make it
    bytes_per_token: float  # expected: the occupied entries at their stored sizes
    format_bytes: int  # fixed width, before compression
    detail: dict = field(default_factory=dict)

    @property
    def overrides(self) -> str:
        return " ".join(f"derive.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.settings.items())

    @property
    def name(self) -> str:
        return {"sampled": f"sampled{self.size:g}-narrow", "topk-q8": f"topk{self.size:g}-q8-narrow",
                "topk-q4": f"topk{self.size:g}-q4-narrow", "topk-fp16": f"topk{self.size:g}-fp16-narrow",
                "topk-adaptive-q8": f"topk{self.detail.get('k', 0)}-p{self.size:g}-q8-narrow"}[self.family]


def _interpolate(table: dict[str, float], x: float) -> float:
    """A value of the audit's table keyed by draws (log-spaced), at ``x`` (linear in log x)."""
    pts = sorted((float(k), v) for k, v in table.items())
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return pts[-1][1] if x > pts[-1][0] else pts[0][1]


def candidates(audit: dict, m: Manifest, split: str = "train") -> list[Candidate]:
    """What the cache of manifest ``m`` can derive (narrow ids; the top-k at its first
    temperature), with the expected storage from its ``audit`` (stage 2's report)."""
    stats = audit["splits"].get(split) or next(iter(audit["splits"].values()))
    temps = len(m.temperatures[:1])
    narrow = m.num_classes <= NARROW_PAD  # ids in 2 bytes (and counts in 1) where the vocabulary allows
    ib = 2 if narrow else 4
    out: list[Candidate] = []
    k_max = m.num_classes if "full" in m.modes else m.k if "topk" in m.modes else 0
    sizes = [2**i for i in range(int(math.log2(k_max)) + 1)] if k_max else []
    for k in sizes:
        for family, bits in (("topk-fp16", 16), ("topk-q8", 8), ("topk-q4", 4)):
            values = 2 * k if bits == 16 else k if bits == 8 else (k + 1) // 2
            q = 8 if bits < 16 else 0
            fmt = ib * k + values + q + 4 * temps
            out.append(Candidate(family, k, {"mode": "topk", "k": k, "narrow": narrow, "value_bits": bits}, fmt, fmt))
    if k_max and "adaptive_k" in stats:
        k = sizes[-1]
        for p, mean_k in stats["adaptive_k"].items():
            out.append(Candidate("topk-adaptive-q8", float(p),
                                 {"mode": "topk", "k": k, "top_p": float(p), "value_bits": 8, "narrow": narrow},
                                 (ib + 1) * mean_k + 8 + 4 * temps, (ib + 1) * k + 8 + 4 * temps,
                                 {"k": k, "mean_k": mean_k, "reached": stats["adaptive_reached"][p]}))
    if "sampled" in m.modes and "expected_distinct" in stats:
        top1, cb = ib, 1 if narrow else 2  # a sampled-only child keeps the argmax
        for s in (2**i for i in range(int(math.log2(m.samples)) + 1)):
            distinct = min(_interpolate(stats["expected_distinct"], s), s)
            out.append(Candidate("sampled", s, {"mode": "sampled", "samples": s, "narrow": narrow},
                                 (ib + cb) * distinct + 4 + top1, (ib + cb) * s + 4 + top1, {"distinct": distinct}))
    return out


def plan(audit: dict, m: Manifest, budget: float, split: str = "train") -> dict:
    """The representation to derive for ``budget`` bytes per token, and every candidate
    that fits, by family: ``{"budget", "choice": Candidate | None, "fits": [...]}``."""
    fits = [c for c in candidates(audit, m, split) if c.bytes_per_token <= budget]
    choice = None
    for family in PREFERENCE:
        members = [c for c in fits if c.family == family]
        if members:
            choice = max(members, key=lambda c: c.size)
            break
    return {"budget": budget, "choice": choice, "fits": fits}


def describe(p: dict) -> str:
    """The plan as the lines stage 2 prints."""
    c = p["choice"]
    if c is None:
        return (f"plan: nothing this cache can derive fits {p['budget']:g} B/token (the smallest top-k or sampled "
                "row is larger): raise cache.budget_bytes_per_token")
    lines = [f"plan for {p['budget']:g} B/token: {c.name}, expected {c.bytes_per_token:.1f} B/token "
             f"({c.format_bytes} in the format): stage=2 {c.overrides}"]
    best = {}
    for x in p["fits"]:
        if x.family not in best or x.size > best[x.family].size:
            best[x.family] = x
    for family in PREFERENCE:
        if family in best and best[family] is not c:
            lines.append(f"  also within budget: {best[family].name} ({best[family].bytes_per_token:.1f} B/token)")
    return "\n".join(lines)
