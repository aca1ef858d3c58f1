"""Device and precision choice: an explicit precision is kept; ``auto`` is measured on the
model's matmul shapes once per machine, and a cache is read in the precision it was
captured in, whatever this machine would choose."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from pipeline.device import BF16_MARGIN, autocast, resolve_precision

CPU = torch.device("cpu")
SHAPES = [(64, 128), (128, 64)]


def test_an_explicit_precision_is_kept_without_measuring(tmp_path):
    memo = tmp_path / "precision.json"
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, CPU, SHAPES, str(memo)) == p
    assert not memo.exists()


def test_auto_measures_the_faster_precision_once_per_machine_and_shapes(tmp_path):
    memo = tmp_path / "precision.json"
    chosen = resolve_precision("auto", CPU, SHAPES, str(memo))
    stored = json.loads(memo.read_text())
    (key, entry), = stored.items()
    rates = entry["gflops"]
    assert min(rates.values()) > 0
    assert entry["precision"] == chosen == ("bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32")
    assert json.loads(key)["shapes"] == [list(s) for s in SHAPES] and json.loads(key)["cpu"]
    # kept, not measured again: whatever the file says is the answer
    other = {"fp32": "bf16", "bf16": "fp32"}[chosen]
    memo.write_text(json.dumps({key: {**entry, "precision": other}}))
    assert resolve_precision("auto", CPU, SHAPES, str(memo)) == other
    resolve_precision("auto", CPU, [(32, 32)], str(memo))  # other shapes: a measurement of their own
    assert len(json.loads(memo.read_text())) == 2


def test_autocast_refuses_what_the_device_cannot_run():
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        autocast(CPU, "fp16")


def test_auto_reads_a_cache_in_the_precision_it_was_captured_in(seeded, tmp_path):
    """teacher.precision=auto: stage 1 records what it measured; a later stage whose own
    measurement says otherwise (here: the kept answer flipped) reads the cache as captured."""
    from tests.support import run_cli

    conversions = tmp_path / "conversions"
    run_cli(seeded, "stage=1", f"paths.conversions={conversions}")
    (manifest,) = glob.glob(str(seeded / "caches" / "*" / "manifest.json"))
    recorded = json.load(open(manifest))["fingerprint"]["fields"]["capture"]["precision"]
    memo = conversions / "precision.json"
    stored = json.loads(memo.read_text())
    assert [e["precision"] for e in stored.values()] == [recorded]
    other = {"fp32": "bf16", "bf16": "fp32"}[recorded]
    memo.write_text(json.dumps({k: {**e, "precision": other} for k, e in stored.items()}))
    proc = run_cli(seeded, "stage=3", f"paths.conversions={conversions}", "student=linear")
    assert f"teacher.precision=auto -> {recorded}, the precision the cache at" in proc.stdout + proc.stderr
    # that cache read with another explicit precision: refused, naming both
    proc = run_cli(seeded, "stage=3", f"paths.conversions={conversions}", f"teacher.precision={other}",
                   f"cache.path={os.path.dirname(manifest)}", "student=linear", code=1)
    err = proc.stdout + proc.stderr
    assert f"'precision': '{other}'" in err and f"'precision': '{recorded}'" in err
