"""The planner: what a cache can derive for a byte budget, from its audit."""

from __future__ import annotations

import pytest

from pipeline.cache import Manifest
from pipeline.planner import PREFERENCE, candidates, describe, plan


def manifest(modes=("sampled", "topk"), k=64, samples=16, num_classes=49152) -> Manifest:
    return Manifest(backend="zarr", modes=list(modes), dtype="float16", num_classes=num_classes, rows=100,
                    chunk_rows=10, shard_rows=20, splits={"train": [0, 100]}, fingerprint={}, k=k, samples=samples,
                    temperatures=[1.0])


AUDIT = {"splits": {"train": {  # a synthetic audit: a confident teacher
    "adaptive_k": {"0.5": 1.5, "0.8": 6.0, "0.9": 20.0, "0.95": 40.0, "0.99": 60.0},
    "adaptive_reached": {"0.5": 1.0, "0.8": 0.95, "0.9": 0.8, "0.95": 0.5, "0.99": 0.1},
    "expected_distinct": {"1": 1.0, "2": 1.6, "4": 2.5, "8": 4.0, "16": 6.0, "32": 9.0, "64": 13.0,
                          "128": 18.0, "256": 25.0}}}}


def test_expected_storage_follows_the_audit_and_the_format():
    cs = {c.name: c for c in candidates(AUDIT, manifest())}
    assert cs["topk64-q8-narrow"].bytes_per_token == 64 * 2 + 64 + 8 + 4  # ids, codes, (largest, step), lse
    assert cs["topk16-fp16-narrow"].bytes_per_token == 16 * 4 + 4
    assert cs["topk64-q4-narrow"].bytes_per_token == 64 * 2 + 32 + 8 + 4
    assert cs["sampled16-narrow"].bytes_per_token == pytest.approx(6.0 * 3 + 4 + 2)  # distinct ids x (id + count)
    assert cs["sampled16-narrow"].format_bytes == 16 * 3 + 4 + 2
    assert cs["topk64-p0.9-q8-narrow"].bytes_per_token == pytest.approx(20.0 * 3 + 8 + 4)
    assert "sampled32-narrow" not in cs and "topk128-q8-narrow" not in cs  # at most the cache's draws and K
    wide = {c.name: c for c in candidates(AUDIT, manifest(num_classes=100_000))}
    assert wide["topk64-q8-narrow"].settings["narrow"] is False  # ids past uint16: stored wide, and costed so
    assert wide["topk64-q8-narrow"].bytes_per_token == 64 * 4 + 64 + 8 + 4


@pytest.mark.parametrize("budget,name", [(10, "sampled1-narrow"), (20, "sampled8-narrow"), (30, "sampled16-narrow"),
                                         (400, "sampled16-narrow")])
def test_the_plan_takes_the_preferred_family_largest_member_within_budget(budget, name):
    p = plan(AUDIT, manifest(), budget)
    assert p["choice"].name == name
    assert all(c.bytes_per_token <= budget for c in p["fits"])
    assert p["choice"].settings["mode"] == "sampled" and name in describe(p)


def test_without_draws_the_plan_falls_to_the_next_family_and_says_when_nothing_fits():
    m = manifest(modes=("topk",), samples=0)
    p = plan(AUDIT, m, 100)
    fams = [f for f in PREFERENCE if any(c.family == f for c in p["fits"])]
    assert p["choice"].family == fams[0] != "sampled"
    assert max(c.size for c in p["fits"] if c.family == fams[0]) == p["choice"].size
    none = plan(AUDIT, m, 5)
    assert none["choice"] is None and "raise cache.budget_bytes_per_token" in describe(none)
