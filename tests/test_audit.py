"""The audit's numbers on a tiny hand-built cache equal values computed here."""

import numpy as np
import pytest
import torch

from pipeline.audit import audit_cache
from pipeline.cache import open_cache
from tests.support import write_cache


def test_audit_matches_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((50, 4)) * 2).astype(np.float32)
    labels = np.full(50, -1, np.int64)
    labels[20:] = rng.integers(0, 4, 30)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=8, splits={"transfer": [0, 20], "train": [20, 50]})
    report = audit_cache(open_cache(str(path)), labels, temperature=2.0)

    p = torch.softmax(torch.from_numpy(logits).double() / 2.0, dim=1)
    entropy = -(p * p.log()).sum(1).numpy()
    train = report["splits"]["train"]
    assert train["rows"] == 30 and train["labeled_rows"] == 30
    assert train["teacher_acc"] == (logits[20:].argmax(1) == labels[20:]).mean()
    np.testing.assert_allclose(train["mean_entropy"], entropy[20:].mean(), rtol=1e-9)
    np.testing.assert_allclose(train["mean_confidence"], p[20:].max(1).values.mean().item(), rtol=1e-9)
    transfer = report["splits"]["transfer"]
    assert transfer["teacher_acc"] is None and transfer["rows"] == 20
    np.testing.assert_allclose(transfer["mean_entropy"], entropy[:20].mean(), rtol=1e-9)
    assert report["nonfinite"] == 0


def test_audit_counts_non_finite_values(tmp_path):
    logits = np.zeros((20, 3), np.float32)
    logits[5, 1] = np.inf
    logits[7, :] = np.nan
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=4, splits={"train": [0, 20]})
    report = audit_cache(open_cache(str(path)), np.zeros(20, np.int64), temperature=1.0)
    assert report["splits"]["train"]["nonfinite"] == 4
    np.testing.assert_allclose(report["splits"]["train"]["mean_entropy"], np.log(3))


def test_ece_coverage_histograms_match_direct_computation(tmp_path):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((90, 6)) * 2).astype(np.float32)
    labels = rng.integers(0, 6, 90)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=8, splits={"train": [0, 90]})
    s = audit_cache(open_cache(str(path)), labels, temperature=1.0)["splits"]["train"]

    p = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    conf, pred = p.max(1), logits.argmax(1)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs((pred[bins == b] == labels[bins == b]).mean() - conf[bins == b].mean()) * (bins == b).sum()
              for b in range(15) if (bins == b).any()) / 90
    np.testing.assert_allclose(s["ece"], ece, rtol=1e-9)
    cov = np.cumsum(-np.sort(-p, axis=1), axis=1).mean(0)
    np.testing.assert_allclose(s["coverage"], cov, rtol=1e-9)
    assert len(s["coverage"]) == 6 and abs(s["coverage"][-1] - 1) < 1e-9
    assert sum(s["confidence_hist"]) == 90 and sum(s["entropy_hist"]) == 90
    assert sum(s["reliability"]["count"]) == 90


def test_nonfinite_counted_per_shard(tmp_path):
    logits = np.zeros((40, 3), np.float32)
    logits[25, 0] = np.nan  # shard 1 (rows 16:32)
    logits[33, :] = np.inf  # shard 2
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=8, shard_chunks=2, splits={"train": [0, 40]})
    report = audit_cache(open_cache(str(path)), np.zeros(40, np.int64), temperature=1.0)
    assert report["nonfinite_per_shard"] == {"0": 0, "1": 1, "2": 3}
    assert report["nonfinite"] == 4


def test_audit_on_a_local_cluster_equals_threads(tmp_path):
    from pipeline.cluster import scheduler

    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((64, 5)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, 64)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=8, splits={"train": [0, 64]})
    reader = open_cache(str(path))
    local = audit_cache(reader, labels, temperature=2.0)
    with scheduler("distributed", workers=2) as client:
        remote = audit_cache(reader, labels, temperature=2.0, scheduler=client)
    assert remote == local
    import dask

    assert dask.config.get("scheduler", None) is None  # the client did not become the default


def test_stage2_joins_an_existing_cluster_by_address(tmp_path, classify_root):
    import glob
    import json

    from distributed import LocalCluster

    from tests.support import run_cli, seed_root

    seed_root(tmp_path, classify_root, caches=True)  # the cache stage 1 wrote
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        proc = run_cli(tmp_path, "stage=2", f"dask.scheduler={cluster.scheduler_address}")
    assert f"connected to {cluster.scheduler_address}" in proc.stdout + proc.stderr
    (audit,) = glob.glob(str(tmp_path / "runs" / "*" / "audit.json"))
    assert json.load(open(audit))["rows"] == 2100


def test_a_topk_only_cache_is_audited_exactly_where_it_can_be(tmp_path):
    """No full logits: accuracy from the first top-k id, confidence from the top logit and
    the row's logsumexp (exact), coverage of the first k cached logits, the kept mass's p10."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((60, 20)) * 2).astype(np.float32)
    labels = rng.integers(0, 20, 60)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", modes=("topk",), k=5, temperatures=(1.0, 2.0), chunk_rows=8,
                splits={"train": [0, 60]})
    s = audit_cache(open_cache(str(path)), labels, temperature=2.0)["splits"]["train"]
    p = torch.softmax(torch.from_numpy(logits).double() / 2.0, dim=1).numpy()
    top = -np.sort(-p, axis=1)[:, :5]
    assert s["teacher_acc"] == (logits.argmax(1) == labels).mean()
    np.testing.assert_allclose(s["mean_confidence"], p.max(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(s["coverage"], np.cumsum(top, axis=1).mean(0), rtol=1e-6)
    kept = top.sum(1)
    assert abs(s["topk_mass_p10"] - np.percentile(kept, 10)) <= 2e-3  # a 1000-bin histogram
    assert "mean_entropy" not in s  # the tail's shape is unknown: no entropy is claimed
    # what the planner sizes adaptive and sampled caches by: the entries each row needs for a
    # mass (at most K), and the distinct ids expected among S draws (the rest counted as new)
    cum = np.cumsum(top, axis=1)
    for q in ("0.5", "0.9"):
        need = np.minimum((cum < float(q)).sum(1) + 1, 5)
        np.testing.assert_allclose(s["adaptive_k"][q], need.mean(), rtol=1e-9)
        np.testing.assert_allclose(s["adaptive_reached"][q], (cum[:, -1] >= float(q)).mean(), rtol=1e-9)
    for d in (1, 16):
        want = (1 - (1 - top) ** d).sum(1) + d * (1 - cum[:, -1])
        np.testing.assert_allclose(s["expected_distinct"][str(d)], want.mean(), rtol=1e-6)
    assert s["expected_distinct"]["1"] == pytest.approx(1.0)


def test_a_sampled_only_cache_is_audited(tmp_path):
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((40, 9)) * 2).astype(np.float32)
    labels = rng.integers(0, 9, 40)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", modes=("sampled",), samples=6, sample_temperature=2.0,
                chunk_rows=8, splits={"train": [0, 40]})
    reader = open_cache(str(path))
    s = audit_cache(reader, labels, temperature=2.0)["splits"]["train"]
    p = torch.softmax(torch.from_numpy(logits).double() / 2.0, dim=1)
    assert s["teacher_acc"] == (logits.argmax(1) == labels).mean()  # from the exact top1 array
    np.testing.assert_allclose(s["mean_sample_entropy"], (-(p * p.log()).sum(1)).mean().item(), rtol=1e-5)
    cnt = reader.arrays["sampled_cnt"].compute()
    assert s["distinct_sampled_mean"] == (cnt > 0).sum(1).mean()


def test_the_audit_progress_moves_on_a_cluster(tmp_path, monkeypatch):
    """A distributed scheduler's tasks are invisible to local callbacks: the bar follows
    the futures instead, one step per block."""
    import pipeline.audit as audit
    from pipeline.cluster import scheduler

    seen = []

    class Bar(audit.tqdm):
        def close(self):
            seen.append((self.n, self.total))  # (tqdm may close a bar twice: at exit and when deleted)
            super().close()

    monkeypatch.setattr(audit, "tqdm", Bar)
    logits = np.random.default_rng(5).standard_normal((64, 5)).astype(np.float32)
    path = tmp_path / "c"
    write_cache(path, logits, dtype="float32", chunk_rows=8, splits={"train": [0, 64]})
    with scheduler("distributed", workers=1) as client:
        audit_cache(open_cache(str(path)), np.zeros(64, np.int64), temperature=1.0, scheduler=client)
    audit_cache(open_cache(str(path)), np.zeros(64, np.int64), temperature=1.0)
    assert len(seen) >= 2 and set(seen) == {(8, 8)}  # both bars end at every block
