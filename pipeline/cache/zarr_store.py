"""Zarr v3 backend: one group, arrays chunked by rows, the sharding codec (one object
per shard), crc32c on every chunk and on the shard index, zstd.

A stock ``zarr.open_group(path)`` reads it; bfloat16 logits are stored as their uint16
bit pattern (NumPy has no bfloat16) and flagged in the array attributes.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.cache.format import IDS, LOGITS, STORAGE_DTYPE, Manifest


def create_arrays(cache_dir: str, m: Manifest, zstd_level: int) -> None:
    group = zarr.open_group(cache_dir, mode="a")
    compressors = [ZstdCodec(level=zstd_level), Crc32cCodec()]
    group.create_array(IDS, shape=(m.rows,), dtype="int64", chunks=(m.chunk_rows,),
                       shards=(m.shard_rows,), compressors=compressors, fill_value=-1, overwrite=True)
    fill = 0 if m.dtype == "bfloat16" else float("nan")  # never-written rows read as NaN, not zeros
    group.create_array(LOGITS, shape=(m.rows, m.num_classes), dtype=STORAGE_DTYPE[m.dtype],
                       chunks=(m.chunk_rows, m.num_classes), shards=(m.shard_rows, m.num_classes),
                       compressors=compressors, fill_value=fill, overwrite=True,
                       attributes={"logical_dtype": m.dtype})


def write_shard(cache_dir: str, start: int, ids: np.ndarray, logits: np.ndarray) -> None:
    """Write one whole shard: a shard-aligned slice, so each shard object is written once
    by one writer (partial writes of a shard from two processes lose data)."""
    group = zarr.open_group(cache_dir, mode="r+")
    stop = start + len(ids)
    group[IDS][start:stop] = ids
    group[LOGITS][start:stop] = logits


def open_arrays(cache_dir: str) -> tuple[zarr.Array, zarr.Array]:
    group = zarr.open_group(cache_dir, mode="r")
    return group[IDS], group[LOGITS]
