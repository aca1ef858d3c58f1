"""The one capture engine: teacher outputs are checked before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_capture_refuses_non_finite_teacher_output_and_the_wrong_width():
    from pipeline.cache import Manifest, ShardRecord, make_fingerprint
    from pipeline.capture import capture_shard

    class Rows:
        unit = "row"

        def __init__(self, logits):
            self.out = logits

        def logits(self, shard):
            yield 0, self.out

        def ids(self, shard):
            return np.arange(shard.start, shard.stop)

    m = Manifest(backend="zarr", modes=["full"], dtype="float16", num_classes=10, rows=104, chunk_rows=4,
                 shard_rows=4, splits={"train": [0, 104]}, fingerprint=make_fingerprint({}))
    logits = torch.zeros(4, 10)
    logits[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite logits at rows \[102\]"):
        capture_shard(Rows(logits), ShardRecord(25, 100, 104), m, torch.device("cpu"))
    with pytest.raises(ValueError, match="expected \\(rows, 10\\)"):
        capture_shard(Rows(torch.zeros(4, 7)), ShardRecord(0, 0, 4), m, torch.device("cpu"))


def test_capture_refuses_a_non_finite_row_before_writing(tmp_path):
    """Values are checked once per shard (no device sync per batch): a NaN row in the middle of
    a shard, with sampling on (multinomial must never see it), is named and nothing is committed."""
    from pipeline.cache import open_cache
    from pipeline.tasks.classify import Classify
    from pipeline.tasks.classify.data import Split, Splits
    from tests.support import compose_config

    class Poisoned(torch.nn.Module):
        def forward(self, x):
            out = x[:, :10].clone()
            out[x[:, 0] == 37.0] = float("nan")
            return out

    x = np.arange(300 * 12, dtype=np.float32).reshape(300, 12) % 40
    x[:, 0] = np.arange(300)
    splits = Splits({name: Split(name, x[i * 100:(i + 1) * 100], np.zeros(100, np.int64))
                     for i, name in enumerate(("transfer", "train", "test"))}, num_classes=10)
    cfg = compose_config("cache.modes=[full,sampled]", "teacher.batch_size=16", "cache.k=4")
    url = str(tmp_path / "c")
    with pytest.raises(ValueError, match=r"non-finite logits at rows \[37\]"):
        Classify(cfg).capture(Poisoned(), splits, url)
    with pytest.raises(Exception, match="incomplete|not complete|partial|manifest"):
        open_cache(url)
