"""Derived caches: top-k equals torch.topk of the parent; the manifest records the parent;
fidelity and storage ratio are reported; the CLI runs it as part of stage 2."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.cache.format import task_file
from pipeline.derive import child_manifest, completed_topk, derive_cache, derive_report
from tests.support import run_cli, write_cache


def test_derived_topk_equals_torch_topk_of_the_parent(tmp_path, tiny_logits):
    parent_path = str(tmp_path / "parent")
    write_cache(parent_path, tiny_logits, dtype="float32", splits={"train": [0, 80], "test": [80, 100]})
    parent = open_cache(parent_path)
    child = child_manifest(parent.manifest, "topk", 3, "float32", [1.0, 2.0], parent_path)
    derive_cache(parent, child, str(tmp_path / "child"))
    r = open_cache(str(tmp_path / "child"))
    full = torch.from_numpy(tiny_logits)
    val, idx = torch.topk(full, 3)
    np.testing.assert_array_equal(r.arrays["topk_idx"].compute(), idx.numpy())
    np.testing.assert_array_equal(r.arrays["topk_val"].compute(), val.numpy())
    np.testing.assert_allclose(r.arrays["lse"].compute()[:, 1], torch.logsumexp(full / 2, -1).numpy(), rtol=1e-6)
    assert r.manifest.info["parent"] == {"path": parent_path, "fingerprint": parent.manifest.fingerprint["digest"],
                                        "source": "full"}
    assert r.manifest.fingerprint["fields"]["capture"]["derived_from"] == parent.manifest.fingerprint["digest"]

    report = derive_report(parent, str(tmp_path / "child"), 2.0)
    p = torch.softmax(full[80:].double() / 2, -1).numpy()
    q = completed_topk(val[80:].numpy(), idx[80:].numpy(), torch.logsumexp(full[80:].double() / 2, -1).numpy(), 7, 2.0)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(report["fidelity_kl"], (p * np.log(p / q)).sum(1).mean(), rtol=1e-4)
    assert report["fidelity_split"] == "test" and 0 < report["storage_ratio"]


def test_a_narrow_derived_cache_holds_the_same_topk_in_uint16_ids(tmp_path, tiny_logits):
    parent_path = str(tmp_path / "parent")
    write_cache(parent_path, tiny_logits, dtype="float32")
    parent = open_cache(parent_path)
    for name, narrow in (("wide", False), ("narrow", True)):
        derive_cache(parent, child_manifest(parent.manifest, "topk", 3, "float16", [1.0], parent_path, narrow),
                     str(tmp_path / name))
    wide, narrow = open_cache(str(tmp_path / "wide")), open_cache(str(tmp_path / "narrow"))
    assert narrow.manifest.narrow and not wide.manifest.narrow
    for name in ("topk_idx", "topk_val", "lse"):
        np.testing.assert_array_equal(wide.arrays[name].compute(), narrow.arrays[name].compute())
    import zarr

    assert zarr.open_group(str(tmp_path / "narrow" / "zarr"), mode="r")["topk_idx"].dtype == "uint16"
    derive_cache(parent, child_manifest(parent.manifest, "topk", 3, "float16", [1.0], parent_path, True, 8),
                 str(tmp_path / "q8"))
    q8 = open_cache(str(tmp_path / "q8"))
    step = q8.arrays["topk_q"].compute()[:, 1:]
    exact = torch.topk(torch.from_numpy(tiny_logits), 3).values.numpy()
    assert (np.abs(q8.arrays["topk_val"].compute() - exact) <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_a_topk_cache_derives_a_narrower_quantized_one_and_a_sampled_one_fewer_draws(tmp_path, tiny_logits):
    """Without full logits: the first k of a top-K (its lse at the kept temperatures), and a
    subset of each row's draws (ids among the parent's, counts within its counts, the
    entropy and the exact argmax carried over)."""
    parent_path = str(tmp_path / "parent")
    write_cache(parent_path, tiny_logits, dtype="float32", modes=("topk", "sampled"), k=5, samples=8,
                temperatures=(1.0, 2.0))
    parent = open_cache(parent_path)
    derive_cache(parent, child_manifest(parent.manifest, "topk", 3, "float32", [2.0], parent_path), str(tmp_path / "t"))
    t = open_cache(str(tmp_path / "t"))
    np.testing.assert_array_equal(t.arrays["topk_idx"].compute(), parent.arrays["topk_idx"][:, :3].compute())
    np.testing.assert_array_equal(t.arrays["topk_val"].compute(), parent.arrays["topk_val"][:, :3].compute())
    np.testing.assert_array_equal(t.arrays["lse"].compute()[:, 0], parent.arrays["lse"][:, 1].compute())
    derive_cache(parent, child_manifest(parent.manifest, "sampled", 0, "float32", [1.0], parent_path, True, samples=3),
                 str(tmp_path / "s"))
    s = open_cache(str(tmp_path / "s"))
    assert s.manifest.samples == 3 and s.manifest.narrow
    pid, pcnt = parent.arrays["sampled_idx"].compute(), parent.arrays["sampled_cnt"].compute()
    sid, scnt = s.arrays["sampled_idx"].compute(), s.arrays["sampled_cnt"].compute()
    assert (scnt.sum(1) == 3).all()
    for r in range(len(sid)):
        have = dict(zip(pid[r].tolist(), pcnt[r].tolist(), strict=True))
        for i, c in zip(sid[r].tolist(), scnt[r].tolist(), strict=True):
            assert (i == -1 and c == 0) or 0 < c <= have.get(i, 0)
    np.testing.assert_array_equal(s.arrays["sampled_ent"].compute(), parent.arrays["sampled_ent"].compute())
    np.testing.assert_array_equal(s.arrays["top1"].compute(), parent.arrays["topk_idx"][:, 0].compute())
    with pytest.raises(ValueError, match="keeps at most the parent's K"):
        child_manifest(parent.manifest, "topk", 6, "float32", [1.0], parent_path)
    with pytest.raises(ValueError, match="choose 1..8"):
        child_manifest(parent.manifest, "sampled", 0, "float32", [1.0], parent_path, samples=9)


def test_subsampled_draws_are_unbiased():
    """A uniform subset of a row's draws: expected counts s * c / S (hypergeometric means),
    checked over 20,000 rows within 4 standard errors."""
    from pipeline.derive import subsample_draws

    n, s = 20000, 3
    idx = np.tile(np.array([[4, 9, 2, -1]], np.int32), (n, 1))
    cnt = np.tile(np.array([[5, 2, 1, 0]], np.int32), (n, 1))
    sid, scnt = subsample_draws(idx, cnt, s, np.random.default_rng(0))
    for cls, c in ((4, 5), (9, 2), (2, 1)):
        got = np.where(sid == cls, scnt, 0).sum(1)
        mean, var = s * c / 8, s * (c / 8) * (1 - c / 8) * (8 - s) / (8 - 1)
        assert abs(got.mean() - mean) < 4 * np.sqrt(var / n), cls


def test_a_token_cache_derives_with_its_sequence_index(tmp_path, tiny_logits):
    """A chat-like token cache (rows at some positions of each sequence): the derived cache
    carries the same offsets, positions and teacher tokenizer, so students read it the same
    way, and the capturing task's fields and files, which the format does not read."""
    offsets = np.array([0, 30, 70, 100])
    positions = np.concatenate([np.arange(3, 33), np.arange(40) * 2, np.arange(5, 35)]).astype(np.int32)
    parent_path = str(tmp_path / "parent")
    tokenizer = b'{"model": {"type": "BPE", "vocab": {"a": 0}}}'
    write_cache(parent_path, tiny_logits, dtype="float32", offsets=offsets, positions=positions, tokenizer=tokenizer)
    parent = open_cache(parent_path)
    parent.manifest.task = {"vocab": {"tokenizer_size": 7}}  # (as a task's plan would hold them)
    parent.storage.write_atomic(b'{"heldout_nll": 1.5}', task_file("teacher_eval.json"))
    derive_cache(parent, child_manifest(parent.manifest, "topk", 3, "float32", [1.0], parent_path),
                 str(tmp_path / "child"))
    child = open_cache(str(tmp_path / "child"))
    assert child.manifest.task == {"vocab": {"tokenizer_size": 7}}
    assert child.storage.read_bytes(task_file("teacher_eval.json")) == b'{"heldout_nll": 1.5}'
    np.testing.assert_array_equal(child.offsets, offsets)
    np.testing.assert_array_equal(child.positions, positions)
    assert child.tokenizer_json == tokenizer.decode() and child.manifest.tokenizer_sha256


def test_stage2_derives_a_topk_cache(seeded):
    tmp_path = seeded
    run_cli(tmp_path, "stage=1")
    proc = run_cli(tmp_path, "stage=2", "derive.mode=topk", "derive.k=3")
    (parent,) = [p for p in glob.glob(str(tmp_path / "caches" / "*")) if "-topk" not in p]
    child = parent + "-topk3-float16"
    assert json.load(open(os.path.join(child, "manifest.json")))["complete"]
    (audit,) = glob.glob(str(tmp_path / "runs" / "*" / "audit.json"))
    d = json.load(open(audit))["derive"]
    assert d["k"] == 3 and d["fidelity_kl"] > 0 and d["storage_ratio"] < 1.0
    assert "derived ['topk'] cache (K=3" in proc.stdout


def test_an_adaptive_topk_derived_from_a_topk_cache_is_the_one_stage_1_captures(tmp_path):
    """derive.top_p from a wider top-K cache cuts each row where capture with cache.top_p
    would: the same ids, values and lse, narrow or not."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((120, 30)) * rng.uniform(0.5, 6, (120, 1))).astype(np.float32)
    parent_path = str(tmp_path / "parent")
    write_cache(parent_path, logits, dtype="float32", modes=("topk",), k=12, temperatures=(1.0,))
    write_cache(tmp_path / "captured", logits, dtype="float32", modes=("topk",), k=8, temperatures=(1.0,), top_p=0.7)
    parent = open_cache(parent_path)
    child = child_manifest(parent.manifest, "topk", 8, "float32", [1.0], parent_path, True, top_p=0.7)
    assert child.top_p == 0.7 and child.fingerprint["fields"]["capture"]["top_p"] == 0.7
    derive_cache(parent, child, str(tmp_path / "derived"))
    got, want = open_cache(str(tmp_path / "derived")), open_cache(str(tmp_path / "captured"))
    for name in ("topk_idx", "topk_val", "lse"):
        np.testing.assert_array_equal(got.arrays[name].compute(), want.arrays[name].compute(), err_msg=name)
    assert (got.arrays["topk_idx"].compute() == -1).any()
    with pytest.raises(ValueError, match=r"derive.top_p=1.5: the probability mass"):
        child_manifest(parent.manifest, "topk", 8, "float32", [1.0], parent_path, top_p=1.5)
