"""The cache writer: shards are encoded and written on a background thread fed by a
bounded queue, so the teacher's forward passes never wait on compression or storage and
host memory stays bounded whatever the dataset size.

Crash safety: a shard counts only once its commit record (``commits/shard-NNNNN.json``)
exists, written after the shard itself. A restart with the same settings keeps committed
shards, deletes whatever an interrupted write left of the others, and writes them again.
Workers: with ``world_size`` W, worker ``rank`` r writes the shards with index % W == r,
so no shard is ever written by two processes. Whoever commits the last shard folds the
commit records into the manifest and marks it ``complete`` (idempotent if two do).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time

import numpy as np

from pipeline.cache.backends import backend
from pipeline.cache.format import (
    MANIFEST,
    Manifest,
    ShardRecord,
    array_specs,
    merge_commits,
    offsets_digest,
    read_commits,
    read_manifest,
    write_commit,
    write_manifest,
    write_offsets,
)
from pipeline.cache.storage import Storage

log = logging.getLogger(__name__)
_DONE = object()
_SAME = ("fingerprint", "rows", "shard_rows", "chunk_rows", "backend", "modes", "dtype", "k", "samples",
         "temperatures", "sample_temperature", "compression", "splits", "sequences", "offsets_sha256", "vocab")


def shard_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array of a shard, in name order, as stored."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def same_plan(a: Manifest, b: Manifest) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in _SAME)


class CacheWriter:
    """Create (rank 0) or join and resume the cache at ``storage`` described by ``manifest``."""

    def __init__(self, *, storage: Storage, manifest: Manifest, zstd_level: int = 3, queue_size: int = 2,
                 rank: int = 0, world_size: int = 1, wait_s: float = 600.0, offsets=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.storage, self.rank, self.world_size = storage, rank, world_size
        self.backend = backend(manifest.backend)
        if (offsets is not None) != bool(manifest.sequences) or (
                offsets is not None and offsets_digest(offsets) != manifest.offsets_sha256):
            raise ValueError("a sequence cache needs its offsets, matching manifest.offsets_sha256")
        self._offsets = offsets
        self.manifest = self._create(manifest, zstd_level) if rank == 0 else self._join(manifest, wait_s)
        merge_commits(self.manifest, read_commits(storage))
        self._clean_leftovers()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)

    def _create(self, fresh: Manifest, zstd_level: int) -> Manifest:
        if self.storage.exists(MANIFEST):
            try:
                old = read_manifest(self.storage)
            except ValueError as e:
                log.warning("existing cache at %s is unreadable (%s); starting it again", self.storage.url, e)
                old = None
            if old is not None and same_plan(old, fresh):
                return old
            if old is not None:
                log.warning("cache %s was started with other settings; starting it again", self.storage.url)
        self.storage.remove()
        self.storage.makedirs()
        self.backend.create(self.storage, fresh, zstd_level)
        if self._offsets is not None:
            write_offsets(self.storage, self._offsets)  # before the manifest that names its digest
        write_manifest(self.storage, fresh)
        return fresh

    def _join(self, fresh: Manifest, wait_s: float) -> Manifest:
        """Workers other than rank 0 wait for rank 0 to create (or keep) the cache."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.storage.exists(MANIFEST):
                try:
                    old = read_manifest(self.storage)
                except ValueError:
                    old = None  # being replaced by rank 0 right now
                if old is not None and same_plan(old, fresh):
                    return old
            time.sleep(0.2)
        raise RuntimeError(f"rank {self.rank}: no cache matching this run appeared at {self.storage.url} within "
                           f"{wait_s:.0f}s; is rank 0 running with the same config?")

    def _clean_leftovers(self) -> None:
        removed = self.storage.remove_temporaries() if self.rank == 0 else 0
        for shard in self.pending():
            self.backend.remove_shard(self.storage, self.manifest, shard)
        done = sum(s.status == "committed" for s in self.manifest.shards)
        if done or removed:
            log.info("resuming cache %s: %d/%d shards already committed; rank %d writes %d more",
                     self.storage.url, done, len(self.manifest.shards), self.rank, len(self.pending()))

    def pending(self) -> list[ShardRecord]:
        """This worker's shards not yet committed."""
        return [s for s in self.manifest.shards
                if s.status != "committed" and s.index % self.world_size == self.rank]

    def submit(self, shard: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
        """Queue a whole shard; blocks while the queue is full (bounded memory)."""
        if self._error is not None:
            raise RuntimeError(f"the cache writer failed: {self._error}") from self._error
        if shard.index % self.world_size != self.rank:
            raise ValueError(f"shard {shard.index} belongs to rank {shard.index % self.world_size}, not {self.rank}")
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
                write_commit(self.storage, shard)  # the shard counts from here on
                shard.status = "committed"
            except BaseException as e:  # surfaced to the producer on its next submit / at exit
                self._error = e

    def __enter__(self) -> CacheWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if exc_type is not None:
            log.error("capture interrupted; re-run with the same config to resume from the committed shards")
            return
        if self._error is not None:
            raise RuntimeError(f"the cache writer failed: {self._error}") from self._error
        self.finalize()

    def finalize(self) -> bool:
        """Mark the cache complete if every shard of every worker is committed."""
        merge_commits(self.manifest, read_commits(self.storage))
        missing = self.manifest.missing_shards()
        if missing:
            if self.world_size == 1:
                raise RuntimeError(f"capture ended with shards {missing} unwritten; re-run stage 1 to finish")
            log.info("rank %d done; %d shard(s) of other workers still pending", self.rank, len(missing))
            return False
        self.manifest.complete = True
        write_manifest(self.storage, self.manifest)  # the last write: the cache is now complete
        return True
