"""Shared fixtures: a tiny real cache written by the real writer, and the real config."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pipeline.cache import CacheWriter, Manifest, make_fingerprint, plan_shards
from pipeline.config import Config, register

register()


def write_cache(path, logits: np.ndarray, *, dtype: str = "float16", chunk_rows: int = 16,
                shard_chunks: int = 2, splits: dict | None = None, fields: dict | None = None) -> Manifest:
    """Write ``logits`` (N, C) as a complete cache through the real writer."""
    n, c = logits.shape
    shard_rows = chunk_rows * shard_chunks
    stored = logits.astype(np.float32)
    if dtype == "float16":
        stored = logits.astype(np.float16)
    elif dtype == "bfloat16":
        import torch
        stored = torch.from_numpy(logits.astype(np.float32)).bfloat16().view(torch.int16).numpy().view(np.uint16)
    m = Manifest(backend="zarr", modes=["full"], dtype=dtype, num_classes=c, rows=n, chunk_rows=chunk_rows,
                 shard_rows=shard_rows, splits=splits or {"train": [0, n]},
                 fingerprint=make_fingerprint(fields or {"dataset": "test"}), shards=plan_shards(n, shard_rows))
    with CacheWriter(cache_dir=str(path), manifest=m) as w:
        for shard in w.pending():
            w.submit(shard, np.arange(shard.start, shard.stop, dtype=np.int64), stored[shard.start:shard.stop])
    return w.manifest


@pytest.fixture
def tiny_logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((100, 7)) * 3).astype(np.float32)


@pytest.fixture
def tiny_cache(tmp_path, tiny_logits):
    path = tmp_path / "cache"
    write_cache(path, tiny_logits, splits={"transfer": [0, 60], "train": [60, 90], "test": [90, 100]})
    return str(path)


def compose_config(*overrides: str) -> Config:
    """The real config tree, composed as the CLI does, shrunk by overrides."""
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)
