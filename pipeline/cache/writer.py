"""The cache writer: shards are encoded and written on a background thread fed by a
bounded queue, so the teacher's forward passes never wait on compression or disk and
host memory stays bounded whatever the dataset size.

Used as a context manager. Each shard is recorded in the manifest (with its checksum)
once written; ``complete: true`` is written last, only on a clean exit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading

import numpy as np

from pipeline.cache import zarr_store
from pipeline.cache.format import Manifest, ShardRecord, read_manifest, write_manifest

log = logging.getLogger(__name__)
_DONE = object()


def shard_checksum(ids: np.ndarray, logits: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(np.ascontiguousarray(logits).tobytes())
    return h.hexdigest()


class CacheWriter:
    """Create (or resume) a cache at ``cache_dir`` described by ``manifest``."""

    def __init__(self, *, cache_dir: str, manifest: Manifest, zstd_level: int = 3, queue_size: int = 2):
        self.cache_dir = cache_dir
        self.manifest = self._open_or_create(cache_dir, manifest, zstd_level)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)

    @staticmethod
    def _open_or_create(cache_dir: str, fresh: Manifest, zstd_level: int) -> Manifest:
        if os.path.exists(os.path.join(cache_dir, "manifest.json")):
            old = read_manifest(cache_dir)
            same = (old.fingerprint == fresh.fingerprint and old.rows == fresh.rows
                    and old.shard_rows == fresh.shard_rows and old.chunk_rows == fresh.chunk_rows)
            if same:
                done = len(old.shards) - len(old.missing_shards())
                log.info("resuming cache %s: %d/%d shards already committed", cache_dir, done, len(old.shards))
                return old
            log.warning("cache %s was started with other settings; starting it again", cache_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.makedirs(cache_dir)
        zarr_store.create_arrays(cache_dir, fresh, zstd_level)
        write_manifest(cache_dir, fresh)
        return fresh

    def pending(self) -> list[ShardRecord]:
        return [s for s in self.manifest.shards if s.status != "committed"]

    def submit(self, shard: ShardRecord, ids: np.ndarray, logits: np.ndarray) -> None:
        """Queue a whole shard; blocks while the queue is full (bounded memory)."""
        if self._error is not None:
            raise RuntimeError(f"the cache writer failed: {self._error}") from self._error
        if len(ids) != shard.rows or logits.shape[0] != shard.rows:
            raise ValueError(f"shard {shard.index} expects {shard.rows} rows, got {len(ids)}")
        self._queue.put((shard, ids, logits))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is not None:
                continue
            shard, ids, logits = item
            try:
                zarr_store.write_shard(self.cache_dir, shard.start, ids, logits)
                shard.sha256 = shard_checksum(ids, logits)
                shard.status = "committed"
                write_manifest(self.cache_dir, self.manifest)
            except BaseException as e:  # surfaced to the producer on its next submit / at exit
                self._error = e

    def __enter__(self) -> CacheWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if exc_type is not None:
            log.error("capture interrupted; %d shard(s) committed, re-run to resume",
                      len(self.manifest.shards) - len(self.manifest.missing_shards()))
            return
        if self._error is not None:
            raise RuntimeError(f"the cache writer failed: {self._error}") from self._error
        missing = self.manifest.missing_shards()
        if missing:
            raise RuntimeError(f"capture ended with shards {missing} unwritten; re-run stage 1 to finish")
        self.manifest.complete = True
        write_manifest(self.cache_dir, self.manifest)  # the last write: the cache is now complete
