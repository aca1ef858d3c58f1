"""The cache writer: shards are encoded and written on a background thread fed by a
bounded queue, so the teacher's forward passes never wait on compression or storage and
host memory stays bounded whatever the dataset size.

Used as a context manager. Each shard is recorded in the manifest (with its checksum)
once written; ``complete: true`` is written last, only on a clean exit.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading

import numpy as np

from pipeline.cache.backends import backend
from pipeline.cache.format import MANIFEST, Manifest, ShardRecord, array_specs, read_manifest, write_manifest
from pipeline.cache.storage import Storage

log = logging.getLogger(__name__)
_DONE = object()


def shard_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array of a shard, in name order, as stored."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


class CacheWriter:
    """Create (or resume) the cache at ``storage`` described by ``manifest``."""

    def __init__(self, *, storage: Storage, manifest: Manifest, zstd_level: int = 3, queue_size: int = 2):
        self.storage = storage
        self.backend = backend(manifest.backend)
        self.manifest = self._open_or_create(manifest, zstd_level)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)

    def _open_or_create(self, fresh: Manifest, zstd_level: int) -> Manifest:
        if self.storage.exists(MANIFEST):
            old = read_manifest(self.storage)
            keys = ("fingerprint", "rows", "shard_rows", "chunk_rows", "backend", "modes", "k", "samples",
                    "temperatures", "sample_temperature", "compression")
            if all(getattr(old, k) == getattr(fresh, k) for k in keys):
                done = len(old.shards) - len(old.missing_shards())
                log.info("resuming cache %s: %d/%d shards already committed", self.storage.url, done,
                         len(old.shards))
                return old
            log.warning("cache %s was started with other settings; starting it again", self.storage.url)
        self.storage.remove()
        self.storage.makedirs()
        self.backend.create(self.storage, fresh, zstd_level)
        write_manifest(self.storage, fresh)
        return fresh

    def pending(self) -> list[ShardRecord]:
        return [s for s in self.manifest.shards if s.status != "committed"]

    def submit(self, shard: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
        """Queue a whole shard; blocks while the queue is full (bounded memory)."""
        if self._error is not None:
            raise RuntimeError(f"the cache writer failed: {self._error}") from self._error
        expected = set(array_specs(self.manifest))
        if set(arrays) != expected:
            raise ValueError(f"shard {shard.index}: arrays {sorted(arrays)} given, the cache holds {sorted(expected)}")
        bad = {k: len(v) for k, v in arrays.items() if len(v) != shard.rows}
        if bad:
            raise ValueError(f"shard {shard.index} expects {shard.rows} rows; got {bad}")
        self._queue.put((shard, arrays))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is not None:
                continue
            shard, arrays = item
            try:
                self.backend.write_shard(self.storage, self.manifest, shard, arrays)
                shard.sha256 = shard_checksum(arrays)
                shard.status = "committed"
                write_manifest(self.storage, self.manifest)
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
        write_manifest(self.storage, self.manifest)  # the last write: the cache is now complete
