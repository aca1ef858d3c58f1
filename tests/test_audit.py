"""The audit's numbers on a tiny hand-built cache equal values computed here."""

import numpy as np
import torch

from pipeline.audit import audit_cache
from pipeline.cache import open_cache
from tests.conftest import write_cache


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
