"""Opening a cache: the manifest is checked (version, completeness, fingerprint) before
any array is touched; arrays come back as lazy Dask arrays chunked like the store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask.array as da
import numpy as np

from pipeline.cache import zarr_store
from pipeline.cache.fingerprint import check_fingerprint
from pipeline.cache.format import Manifest, read_manifest
from pipeline.cache.writer import shard_checksum

log = logging.getLogger(__name__)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class CacheReader:
    path: str
    manifest: Manifest
    ids: da.Array  # (N,) int64
    logits: da.Array  # (N, C) float16 | float32 (bfloat16 is decoded to float32)

    def split_range(self, name: str) -> tuple[int, int]:
        if name not in self.manifest.splits:
            raise KeyError(f"cache {self.path!r} has no split {name!r}; it has {list(self.manifest.splits)}")
        start, stop = self.manifest.splits[name]
        return int(start), int(stop)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def verify(self) -> None:
        """Re-read every committed shard and compare its checksum with the manifest's."""
        ids_arr, logits_arr = zarr_store.open_arrays(self.path)
        for shard in self.manifest.shards:
            if shard.status != "committed":
                continue
            ids = ids_arr[shard.start:shard.stop]
            logits = logits_arr[shard.start:shard.stop]
            if shard_checksum(ids, logits) != shard.sha256:
                raise ValueError(f"cache {self.path!r}: shard {shard.index} (rows {shard.start}:{shard.stop}) "
                                 "does not match its checksum in the manifest; the cache is damaged, re-run stage 1")


def open_cache(path: str, *, expected: dict | None = None, allow_partial: bool = False) -> CacheReader:
    """Open the cache at ``path``. ``expected`` holds fingerprint fields to check;
    an incomplete cache is refused (naming the missing shards) unless ``allow_partial``."""
    m = read_manifest(path)
    if expected is not None:
        check_fingerprint(m.fingerprint, expected, path)
    missing = m.missing_shards()
    if missing and not allow_partial:
        raise ValueError(f"cache {path!r} is incomplete: shards {missing[:20]}{'...' if len(missing) > 20 else ''} "
                         f"of {len(m.shards)} were never committed; re-run stage 1 with the same config to finish it")
    if not m.complete and not allow_partial:
        raise ValueError(f"cache {path!r} is not marked complete; re-run stage 1 with the same config to finish it")
    ids_arr, logits_arr = zarr_store.open_arrays(path)
    ids = da.from_zarr(ids_arr, chunks=(m.chunk_rows,))
    logits = da.from_zarr(logits_arr, chunks=(m.chunk_rows, m.num_classes))
    if m.dtype == "bfloat16":
        logits = logits.map_blocks(bf16_bits_to_float32, dtype=np.float32)
    return CacheReader(path, m, ids, logits)
