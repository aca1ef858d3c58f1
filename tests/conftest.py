"""Shared fixtures: a tiny real cache written by the real writer, and the real config."""

from __future__ import annotations

from pipeline.run import set_environment_defaults

set_environment_defaults()  # as the CLI does, before torch and Numba load

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.cache import CacheWriter, Manifest, Storage, make_fingerprint, plan_shards  # noqa: E402
from pipeline.cache.format import SequenceIndex  # noqa: E402
from pipeline.config import Config, register  # noqa: E402
from pipeline.representations import host_arrays, represent  # noqa: E402

register()


def write_cache(path, logits: np.ndarray, *, dtype: str = "float16", chunk_rows: int = 16,
                shard_chunks: int = 2, splits: dict | None = None, fields: dict | None = None,
                backend: str = "zarr", modes=("full",), k: int = 3, samples: int = 8,
                temperatures=(1.0, 2.0), sample_temperature: float = 1.0, compression: str = "ints",
                offsets: np.ndarray | None = None, positions: np.ndarray | None = None,
                tokenizer: bytes | None = None, narrow: bool = False, value_bits: int = 16,
                top_p: float = 0.0) -> Manifest:
    """Write ``logits`` (N, C) as a complete cache through the real writer and the real
    representations code (top-k, sampling) on CPU; with ``offsets``, rows are the tokens of
    sequences (a row's id is its sequence's index), at ``positions`` when given, with the
    teacher's ``tokenizer`` JSON when given."""
    n, c = logits.shape
    shard_rows = chunk_rows * shard_chunks
    m = Manifest(backend=backend, modes=sorted(modes), dtype=dtype, num_classes=c, rows=n, chunk_rows=chunk_rows,
                 shard_rows=shard_rows, splits=splits or {"train": [0, n]},
                 fingerprint=make_fingerprint(fields or {"dataset": "test"}), shards=plan_shards(n, shard_rows),
                 k=k if "topk" in modes else 0, samples=samples if "sampled" in modes else 0,
                 temperatures=list(temperatures), sample_temperature=sample_temperature, compression=compression,
                 narrow=narrow, value_bits=value_bits if "topk" in modes else 16, top_p=top_p)
    ids = np.arange(n, dtype=np.int64)
    index = None
    if offsets is not None:
        index = SequenceIndex(offsets, positions, tokenizer)
        index.describe(m)
        ids = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    t = torch.from_numpy(logits.astype(np.float32))
    with CacheWriter(storage=Storage(str(path)), manifest=m, index=index) as w:
        for shard in w.pending():
            gen = torch.Generator().manual_seed(shard.index)
            arrays = host_arrays(represent(t[shard.start:shard.stop], m, gen), m)
            arrays["ids"] = ids[shard.start:shard.stop]
            w.submit(shard, arrays)
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
