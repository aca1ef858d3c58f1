"""Integration: the real CLI, as a user runs it, on a shrunken default."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import zarr
from datasets import load_from_disk

from pipeline.distances import DISTANCES
from tests.support import error_line, run_cli, seed_root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, classify_root):
    """All three stages by the CLI, from the session's fitted teacher and dataset."""
    root = tmp_path_factory.mktemp("kd")
    seed_root(root, classify_root)
    proc = run_cli(root)
    return root, proc


def test_all_stages_write_cache_audit_and_results(full_run):
    root, proc = full_run
    (cache,) = glob.glob(str(root / "caches" / "*"))
    g = zarr.open_group(os.path.join(cache, "zarr"), mode="r")
    assert g["logits"].shape == (2100, 10) and g["logits"].dtype == np.float16
    np.testing.assert_array_equal(g["ids"][:], np.arange(2100))
    assert np.isfinite(g["logits"][:]).all()
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["complete"] is True and manifest["rows"] == 2100
    assert manifest["splits"] == {"transfer": [0, 1500], "train": [1500, 1900], "test": [1900, 2100]}
    assert all(s["status"] == "committed" for s in manifest["shards"]) and len(manifest["shards"]) == 5
    assert set(manifest["fingerprint"]["fields"]) == {"format_version", "dataset", "teacher", "teacher_weights", "capture"}

    (run_dir,) = glob.glob(str(root / "runs" / "*"))
    audit = json.load(open(os.path.join(run_dir, "audit.json")))
    assert audit["rows"] == 2100 and audit["nonfinite"] == 0
    for plot in ("confidence", "entropy", "reliability", "coverage"):
        assert os.path.getsize(os.path.join(run_dir, f"audit_{plot}.png")) > 1000
    assert 0 <= audit["splits"]["test"]["ece"] <= 1 and len(audit["splits"]["test"]["coverage"]) == 10
    # the teacher's test accuracy is exactly the cached test logits' argmax against the labels
    # (float16 logits, one row each: a tie would be the same tie in the audit)
    (dataset,) = glob.glob(str(root / "datasets" / "mnist1d-*"))
    labels = np.asarray(load_from_disk(dataset)["test"]["y"])
    test_logits = g["logits"][slice(*manifest["splits"]["test"])]
    assert audit["splits"]["test"]["teacher_acc"] == (test_logits.argmax(1) == labels).mean()
    results = json.load(open(os.path.join(run_dir, "results.json")))
    rows = {r["student"]: r for r in results["students"]}
    assert set(rows) == {"linear", "mlp"}
    for r in rows.values():
        assert {"student", "test_acc", "labels_only_acc", "teacher_acc", "params"} <= set(r)
        assert r["teacher_acc"] == audit["splits"]["test"]["teacher_acc"]
    assert rows["linear"]["params"] == 40 * 10 + 10
    assert os.path.exists(os.path.join(run_dir, "students", "mlp", "distilled", "model.safetensors"))
    assert "| mlp | kl |" in proc.stdout and "teacher test accuracy" in proc.stdout


def test_stage3_alone_needs_no_teacher(full_run):
    root, _ = full_run
    shutil.rmtree(root / "teachers")  # stage 3 must not need the teacher, even on disk
    proc = run_cli(root, "stage=3", "student=linear")
    assert "| linear | kl |" in proc.stdout


def test_stage1_again_reuses_the_complete_cache(full_run):
    root, _ = full_run
    (cache,) = glob.glob(str(root / "caches" / "*"))
    before = os.path.getmtime(os.path.join(cache, "zarr", "logits", "c", "0", "0"))
    proc = run_cli(root, "stage=1")  # teacher was deleted above: refits deterministically, same weights
    assert os.path.getmtime(os.path.join(cache, "zarr", "logits", "c", "0", "0")) == before
    assert "5/5 shards already committed" in proc.stdout + proc.stderr


def test_size_guard_refuses_a_full_capture_above_the_limit(seeded):
    tmp_path = seeded
    proc = run_cli(tmp_path, "stage=1", "cache.max_full_gb=0.00001", code=1)
    out = proc.stdout + proc.stderr
    assert "projected cache size" in out and "above cache.max_full_gb=1e-05" in out and "cache.modes=[topk]" in out
    assert not glob.glob(str(tmp_path / "caches" / "*" / "manifest.json"))


def test_stage1_captures_every_representation_in_one_pass(seeded):
    tmp_path = seeded
    run_cli(tmp_path, "stage=1", "cache=arrow", "cache.modes=[full,topk,sampled]", "cache.k=4", "cache.samples=16")
    (cache,) = glob.glob(str(tmp_path / "caches" / "*"))
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["modes"] == ["full", "sampled", "topk"] and manifest["backend"] == "arrow"
    assert manifest["fingerprint"]["fields"]["capture"]["k"] == 4
    from pipeline.cache import open_cache

    r = open_cache(cache)
    logits = r.logits.compute().astype(np.float32)
    np.testing.assert_array_equal(r.arrays["topk_idx"][:50].compute(), np.argsort(-logits[:50], axis=1)[:, :4])
    assert (r.arrays["sampled_cnt"].compute().sum(1) == 16).all()
    for loss in ("topk_kl", "sampled_kl"):  # stage 3 trains from the sparse representations too
        proc = run_cli(tmp_path, "stage=3", "cache=arrow", "cache.modes=[full,topk,sampled]", "cache.k=4",
                       "cache.samples=16", "student=linear", f"loss={loss}")
        assert f"| linear | {loss} |" in proc.stdout


def test_sparse_loss_on_a_full_only_cache_says_what_to_capture(full_run):
    root, _ = full_run
    (cache,) = glob.glob(str(root / "caches" / "*"))
    proc = run_cli(root, "stage=3", "loss=topk_kl", f"cache.path={cache}", "student=linear", code=1)
    out = proc.stdout + proc.stderr
    assert "loss.distance=topk_kl trains from the 'topk' representation" in out and "cache.modes=[topk]" in out


def test_student_class_count_differing_from_the_cache_is_explained(full_run):
    root, _ = full_run
    (cache,) = glob.glob(str(root / "caches" / "*"))
    proc = run_cli(root, "stage=3", "data.num_classes=12", f"cache.path={cache}", code=1)
    assert "over 10 classes, but this run has data.num_classes=12" in proc.stdout + proc.stderr
    assert "set data.num_classes=10" in proc.stdout + proc.stderr


@pytest.mark.slow  # make test-all
def test_a_narrow_cache_trains_the_same_student_in_fewer_bytes(tmp_path, classify_root):
    """cache.narrow=true through the real CLI: the same audit and the same trained student as
    the wide cache (the stored values are the same), in fewer bytes per row."""
    out = {}
    for narrow in ("false", "true"):
        root = tmp_path / narrow
        seed_root(root, classify_root)
        run_cli(root, "cache.modes=[topk,sampled]", "cache.k=3", "cache.samples=4", "loss=sampled_kl",
                "student=linear", f"cache.narrow={narrow}")
        (audit,) = glob.glob(str(root / "runs" / "*" / "audit.json"))
        (results,) = glob.glob(str(root / "runs" / "*" / "results.json"))
        out[narrow] = json.load(open(audit)), json.load(open(results))["students"][0]
    (wa, ws), (na, ns) = out["false"], out["true"]
    for key in ("test_acc", "agreement", "labels_only_acc"):
        assert ws[key] == ns[key], key
    assert wa["splits"]["test"]["coverage"] == na["splits"]["test"]["coverage"]
    wb, nb = wa["bytes_per_row"], na["bytes_per_row"]
    assert nb["topk_computed"] == wb["topk_computed"] - 3 * 2  # ids 4 -> 2 bytes
    assert nb["sampled_computed"] == wb["sampled_computed"] - 4 * 2 - 4 * 1 - 2  # ids, counts 2 -> 1, top1
    assert nb["total_on_disk"] < wb["total_on_disk"]

    # and top-k values in 4 bits, in adaptive rows: the whole run, audit included, reads them
    root = tmp_path / "q4"
    seed_root(root, classify_root)
    run_cli(root, "cache.modes=[topk]", "cache.k=3", "loss=topk_kl", "student=linear", "cache.narrow=true",
            "cache.value_bits=4", "cache.top_p=0.6")
    (audit,) = glob.glob(str(root / "runs" / "*" / "audit.json"))
    q4 = json.load(open(audit))
    (results,) = glob.glob(str(root / "runs" / "*" / "results.json"))
    assert json.load(open(results))["students"][0]["teacher_acc"] == q4["splits"]["test"]["teacher_acc"]
    assert q4["splits"]["test"]["nonfinite"] == 0
    (manifest,) = glob.glob(str(root / "caches" / "*" / "manifest.json"))
    assert json.load(open(manifest))["top_p"] == 0.6
    assert q4["bytes_per_row"]["topk_computed"] == 3 * 2 + 2 + 8 + 4 * 2  # ids, codes, topk_q, lse at T = 1, 2
    assert len(q4["splits"]["test"]["coverage"]) == 3


def test_a_topk_only_and_a_sampled_only_cache_go_through_all_three_stages(tmp_path, classify_root):
    """What stage 1's size guard recommends must work end to end: capture, the audit (its
    teacher accuracy exact: the cached argmax, from the top-k cache's first id or the
    sampled cache's top1, not the most-drawn class), training and the results."""
    acc, audits = {}, {}
    for modes, loss in (("[topk]", "topk_kl"), ("[sampled]", "sampled_kl")):
        root = tmp_path / modes.strip("[]")
        seed_root(root, classify_root)
        proc = run_cli(root, f"cache.modes={modes}", "cache.k=3", "cache.samples=2", f"loss={loss}",
                       "student=linear")
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("teacher test accuracy")]
        acc[modes] = line
        (path,) = glob.glob(str(root / "runs" / "*" / "audit.json"))
        audits[modes] = json.load(open(path))
        (results,) = glob.glob(str(root / "runs" / "*" / "results.json"))
        assert audits[modes]["splits"]["test"]["teacher_acc"] == json.load(open(results))["students"][0]["teacher_acc"]
    assert acc["[sampled]"] == acc["[topk]"]
    teacher = json.load(open(glob.glob(str(tmp_path / "topk" / "teachers" / "*" / "config.json"))[0]))
    assert acc["[sampled]"] == f"teacher test accuracy: {teacher['test_acc']:.4f}"
    topk, sampled = audits["[topk]"]["splits"]["test"], audits["[sampled]"]["splits"]["test"]
    assert len(topk["coverage"]) == 3 and 0 < topk["coverage"][-1] <= 1 and topk["ece"] is not None
    assert sampled["mean_sample_entropy"] > 0 and 1 <= sampled["distinct_sampled_mean"] <= 2


def test_stage_2_plans_for_a_byte_budget_and_derives_the_plan(tmp_path, classify_root):
    """cache.budget_bytes_per_token: stage 2 prints and records the plan from its audit, and
    derive.mode=auto derives the pick (here: the most draws within 12 B/row of 8, narrow),
    which stage 3 then trains from by cache.path."""
    root = tmp_path / "r"
    seed_root(root, classify_root)
    run_cli(root, "stage=1", "cache.modes=[topk,sampled]", "cache.k=8", "cache.samples=8", "student=linear")
    proc = run_cli(root, "stage=2", "cache.modes=[topk,sampled]", "cache.k=8", "cache.samples=8", "student=linear",
                   "cache.budget_bytes_per_token=12", "derive.mode=auto")
    (audit,) = glob.glob(str(root / "runs" / "*" / "audit.json"))
    report = json.load(open(audit))
    choice = report["plan"]["choice"]
    assert choice["settings"]["mode"] == "sampled" and choice["bytes_per_token"] <= 12
    assert all(f["bytes_per_token"] <= 12 for f in report["plan"]["fits"])
    assert f"plan for 12 B/token: {choice['name']}" in proc.stdout
    child = report["derive"]["path"]
    m = json.load(open(os.path.join(child, "manifest.json")))
    assert m["modes"] == ["sampled"] and m["samples"] == choice["settings"]["samples"] and m["narrow"]
    run_cli(tmp_path / "r", "stage=3", "cache.modes=[topk,sampled]", "cache.k=8", "student=linear", "loss=sampled_kl",
            f"cache.path={child}")


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(full_run, monkeypatch):
    """Only the project's own user errors (pipeline.errors.UserError) are one line: an
    IndexError inside a kernel wrapper is a bug, and is shown with its traceback."""
    from pipeline import kernels

    root, _ = full_run

    def broken_kernel(*args, **kwargs):
        return np.arange(3)[7]  # IndexError

    monkeypatch.setattr(kernels, "kl", broken_kernel)
    out = run_cli(root, "stage=3", "student=linear", "train.resume=false", code=1)
    text = out.stdout + out.stderr
    assert "Traceback" in text and "IndexError: index 7 is out of bounds" in text and "broken_kernel" in text
    monkeypatch.undo()

    line = error_line(run_cli(root, "stage=3", "student=linear", "loss=topk_kl", code=1))
    assert "ConfigError: loss.distance=topk_kl trains from the 'topk'" in line
    assert "cache.modes=[topk]" in line
    wrong_key = run_cli(root, "stage=3", "loss.temprature=2", code=1)  # Hydra's own one-line error
    assert "Traceback" not in wrong_key.stderr and "temprature" in wrong_key.stderr


@pytest.mark.parametrize("name", [n for n, d in DISTANCES.items() if d.reads == "full"])
def test_every_declared_dense_distance_trains_a_student_by_the_cli(full_run, name):
    root, _ = full_run
    proc = run_cli(root, "stage=3", "student=linear", f"loss={name}")
    assert f"| linear | {name} |" in proc.stdout
