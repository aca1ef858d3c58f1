"""The cache writer: shards are encoded and written on a background thread fed by a
bounded queue, so the teacher's forward passes never wait on compression or storage and
host memory stays bounded whatever the dataset size.

Ownership: stage 1 writes only into a path that is absent, empty, or a cache of this
project (``kdcache.json``); a cache made with other settings is replaced only with
``overwrite=True``, and what differs is named.

Crash safety: a shard counts only once its commit record (``commits/shard-NNNNN.json``)
exists, written after the shard itself. A restart with the same settings keeps committed
shards, re-captures the rest, and first checks the committed ones (their objects exist
with the sizes written; with ``verify`` every chunk is decoded and hashed): a damaged
shard is uncommitted and captured again, so stage 1 heals a cache. A damaged manifest is
rebuilt from the plan in ``kdcache.json`` and the commit records.

Concurrency: a process holds a shard's lock (:meth:`Storage.lock`) from the moment it
claims the shard until its commit record is written, and only then deletes what an
interrupted write left of it, so two runs on one cache share the shards out and never
delete each other's work. Creating the cache, rewriting the manifest and healing happen
under the cache's own lock. Workers: with ``world_size`` W, worker ``rank`` r claims the
shards with index % W == r. Whoever commits the last shard folds the commit records into
the manifest and marks it ``complete`` (idempotent if two do).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict

import numpy as np

from pipeline.cache.backends import backend
from pipeline.cache.commits import (
    commit_path,
    merge_commits,
    read_commit,
    read_commits,
    write_commit,
)
from pipeline.cache.format import (
    CACHE_ENTRIES,
    MANIFEST,
    MARKER,
    OFFSETS,
    POSITIONS,
    Manifest,
    ShardRecord,
    array_specs,
    identify,
    read_manifest,
    write_index,
    write_manifest,
)
from pipeline.cache.health import damaged_shards, describe, object_sizes, shard_checksum
from pipeline.cache.storage import LOCKS, Lock, Storage, StorageError, explain_os_error
from pipeline.errors import CacheError

log = logging.getLogger(__name__)
_DONE = object()
_SAME = ("fingerprint", "rows", "shard_rows", "chunk_rows", "backend", "modes", "dtype", "k", "samples",
         "temperatures", "sample_temperature", "compression", "splits", "sequences", "offsets_sha256", "positions_sha256",
         "tokenizer_sha256", "task", "narrow", "value_bits", "top_p")
WRITE_FIX = "free space or fix the permissions, then re-run stage 1: committed shards are kept"

def same_plan(a: Manifest, b: Manifest) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in _SAME)


def plan_differences(old: Manifest, new: Manifest) -> list[str]:
    """What differs between an existing cache's plan and this run's, field by field."""
    def short(v) -> str:
        r = repr(v)
        return r if len(r) <= 80 else r[:77] + "..."

    out = []
    for k in _SAME:
        a, b = getattr(old, k), getattr(new, k)
        if a == b:
            continue
        if k == "fingerprint":
            fa, fb = a.get("fields", {}), b.get("fields", {})
            out += [f"fingerprint.{f}: cache has {short(fa.get(f))}, this run {short(fb.get(f))}"
                    for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
        else:
            out.append(f"{k}: cache has {short(a)}, this run {short(b)}")
    return out


def shard_lock_name(index: int) -> str:
    return f"shard-{index:05d}"


class CacheWriter:
    """Create (rank 0) or join and resume the cache at ``storage`` described by ``manifest``."""

    def __init__(self, *, storage: Storage, manifest: Manifest, zstd_level: int = 3, queue_size: int = 2,
                 rank: int = 0, world_size: int = 1, wait_s: float = 600.0, index=None,
                 overwrite: bool = False, verify: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.storage, self.rank, self.world_size, self.wait_s = storage, rank, world_size, wait_s
        self.backend = backend(manifest.backend)
        if (index is not None) != bool(manifest.sequences) or (index is not None and not index.matches(manifest)):
            raise ValueError("a sequence cache needs its SequenceIndex, matching the manifest's digests")
        self._index, self._zstd_level = index, zstd_level
        if rank == 0:
            self._refuse_foreign()  # before the lock file is made: nothing is written there
            with storage.lock("cache"):
                self.manifest = self._open_or_create(manifest, overwrite)
        else:
            self.manifest = self._join(manifest, wait_s)
        self.written: list[int] = []  # shards this writer wrote (tests count them)
        self._held: dict[int, Lock] = {}
        self._leftovers: dict[int, list[str]] = {}  # shard -> temporaries an interrupted write left
        self._heal(verify)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)

    # -- what is at the path ------------------------------------------------------------------

    def _inspect(self) -> tuple[str, Manifest | None, str]:
        """What is at the cache path: ("new" | "cache" | "foreign", the cache's manifest, or
        else its plan, when usable, and what is wrong with it). A folder is a cache only if
        its ``kdcache.json`` or ``manifest.json`` matches its own checksum: a file of that
        name written by anything else does not make a folder ours."""
        st = self.storage
        if not st.exists():
            return "new", None, ""
        if not st.isdir():
            return "foreign", None, "a file, not a folder"
        names = {n for n in st.top_level() if n != LOCKS and Storage.temporary_of(n) is None}
        if not names:
            return "new", None, ""  # empty, or a cache being created by another process right now
        ours_m, man, why_m = identify(st, MANIFEST) if MANIFEST in names else (False, None, f"{MANIFEST} is missing")
        ours_p, plan, why_p = identify(st, MARKER) if MARKER in names else (False, None, f"{MARKER} is missing")
        if not (ours_m or ours_p):
            shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            return "foreign", None, f"{len(names)} entries that are not a cache of this project ({shown})"
        if man is not None:
            return "cache", man, ""
        return "cache", plan, why_m if plan is not None else f"{why_m}; {why_p}"

    def _refuse_foreign(self) -> tuple[str, Manifest | None, str]:
        """:meth:`_inspect`, refusing a path that holds something other than a cache."""
        kind, old, why = self._inspect()
        if kind == "foreign":
            raise CacheError(f"cache.path {self.storage.url!r} holds {why}: stage 1 writes only into an empty or new "
                             f"folder or a cache of this project ({MARKER}), and never deletes anything else. "
                             "Point cache.path at a new folder")
        return kind, old, why

    def _open_or_create(self, fresh: Manifest, overwrite: bool) -> Manifest:
        if self.storage.isdir():  # the index is written only under this lock: its temporaries are dead
            for name in self.storage.top_level():
                if Storage.temporary_of(name) in (MANIFEST, MARKER, OFFSETS, POSITIONS):
                    self.storage.remove(name)
        kind, old, why = self._refuse_foreign()  # again, under the lock
        url = self.storage.url
        if kind == "cache":
            if old is not None and same_plan(old, fresh):
                self._repair_index(old, why)
                return old
            diffs = plan_differences(old, fresh) if old is not None else [why]
            if not overwrite:
                raise CacheError(f"cache {url!r} was captured with other settings than this run, and is kept:\n  "
                                 + "\n  ".join(diffs) + "\nset cache.overwrite=true to replace it, or point "
                                 "cache.path elsewhere")
            self._refuse_if_busy(old)
            log.warning("cache.overwrite=true: replacing the cache at %s (%s)", url, "; ".join(diffs))
            self.storage.clear(CACHE_ENTRIES)  # the cache's own entries only
        return self._create(fresh)

    def _refuse_if_busy(self, old: Manifest | None) -> None:
        """Never replace a cache another process is writing into."""
        for shard in old.shards if old is not None else []:
            lock = self.storage.lock(shard_lock_name(shard.index), blocking=False)
            if lock is None:
                raise CacheError(f"cache {self.storage.url!r} is being written by another process (shard "
                                 f"{shard.index} is locked): wait for it to finish before replacing the cache")
            lock.release()

    def _create(self, fresh: Manifest) -> Manifest:
        self.storage.makedirs()
        write_manifest(self.storage, fresh, MARKER)  # first: from here on the folder is a cache
        self.backend.create(self.storage, fresh, self._zstd_level)
        if self._index is not None:
            write_index(self.storage, self._index)  # before the manifest that names its digests
        write_manifest(self.storage, fresh)
        return fresh

    def _repair_index(self, m: Manifest, why: str) -> None:
        """The same plan: put back whatever of the cache's index is missing or damaged
        (the plan, the array metadata, the offsets, the manifest), never touching shards."""
        st = self.storage
        if not identify(st, MARKER)[0]:
            log.warning("cache %s: %s is missing or damaged; writing it again", st.url, MARKER)
            plan = Manifest.from_dict(asdict(m))
            plan.complete = False
            for shard in plan.shards:
                shard.status, shard.sha256, shard.nbytes = "pending", None, None
            write_manifest(st, plan, MARKER)
        self.backend.create(st, m, self._zstd_level, missing_only=True)
        if self._index is not None:
            for name in write_index(st, self._index, only_damaged=True):
                log.warning("cache %s: %s was missing or damaged; written again", st.url, name)
        if why:  # the manifest was unusable: rebuilt from the plan, the commits are merged next
            log.warning("cache %s: %s; rebuilding %s from %s and the commit records", st.url, why, MANIFEST, MARKER)
            m.complete = False
            write_manifest(st, m)

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

    # -- healing ------------------------------------------------------------------------------

    def _heal(self, verify: bool) -> None:
        """Check this worker's committed shards; uncommit the damaged ones (captured again
        like any pending shard). The commit records are the truth: a shard the manifest
        calls committed whose record is gone gets its record back if it is healthy."""
        st, m = self.storage, self.manifest
        unreadable: list[int] = []
        commits = read_commits(st, unreadable)
        bad = set(merge_commits(m, commits, strict=False)) | set(unreadable)
        listing = st.listing()
        owner = {k: s.index for s in m.shards for k in (*self.backend.shard_objects(m, s), commit_path(s.index))}
        for key in listing:  # what interrupted writes left, removed when the shard is claimed
            if (obj := Storage.temporary_of(key)) is not None:
                self._leftovers.setdefault(owner.get(obj, -1), []).append(key)
        mine = [s for s in m.shards if s.index % self.world_size == self.rank]
        problems = {i: "its commit record is unreadable or names other rows than the plan" for i in bad
                    if i % self.world_size == self.rank}
        checked = [s for s in mine if s.status == "committed" and s.index not in problems]
        problems |= damaged_shards(st, m, checked, full=verify, progress=True, listing=listing)
        for s in checked:
            if s.index not in problems and s.index not in commits:
                write_commit(st, s)  # healthy, recorded only in the manifest: its record again
        if problems:
            log.warning("cache %s: %d damaged shard(s) will be captured again:%s", st.url, len(problems),
                        describe(st, m, problems))
            for i in sorted(problems):
                self._uncommit(m.shards[i], commits.get(i))
            with st.lock("cache"):  # readers stop trusting these shards
                current = read_manifest(st)
                for shard in (current, m):
                    shard.complete = False
                    for i in problems:
                        shard.shards[i].status, shard.shards[i].sha256, shard.shards[i].nbytes = "pending", None, None
                write_manifest(st, current)
        done = sum(s.status == "committed" for s in m.shards)
        if done:
            log.info("resuming cache %s: %d/%d shards already committed%s; rank %d has %d to write",
                     st.url, done, len(m.shards), " and verified" if verify else "", self.rank, len(self.pending()))

    def _uncommit(self, shard: ShardRecord, judged: ShardRecord | None) -> None:
        """Delete a damaged shard's record and objects, under its lock, unless another
        process re-captured it since it was judged (its record changed)."""
        with self.storage.lock(shard_lock_name(shard.index)):
            now = read_commit(self.storage, shard.index) if judged is not None else None
            if now is not None and (now.sha256, now.nbytes) != (judged.sha256, judged.nbytes):
                return  # someone healed it meanwhile: theirs is the healthy copy
            self.storage.remove(commit_path(shard.index))
            self.backend.remove_shard(self.storage, self.manifest, shard)

    # -- claiming and writing shards ----------------------------------------------------------

    def pending(self) -> list[ShardRecord]:
        """This worker's shards not yet committed."""
        return [s for s in self.manifest.shards
                if s.status != "committed" and s.index % self.world_size == self.rank]

    def claim(self, wait: bool = True):
        """Yield this worker's pending shards, each locked for this process until its commit
        is written: first those nobody else holds, then (``wait``: waiting for each) those
        another process was writing, unless it committed them meanwhile. A caller that
        holds claims it has not submitted must use ``wait=False`` (or it can deadlock with
        another process doing the same)."""
        busy = []
        for shard in self.pending():
            lock = self.storage.lock(shard_lock_name(shard.index), blocking=False)
            if lock is None:
                busy.append(shard)
            elif self._take(shard, lock):
                yield shard
        for shard in busy if wait else []:
            log.info("shard %d is being written by another process; waiting for it", shard.index)
            if self._take(shard, self.storage.lock(shard_lock_name(shard.index))):
                yield shard

    def _take(self, shard: ShardRecord, lock: Lock) -> bool:
        """With ``shard``'s lock held: False (lock released) if another process committed it
        meanwhile; else clear what an interrupted write left of it and keep the lock."""
        try:
            rec = read_commit(self.storage, shard.index)  # a damaged record: captured again below
            if rec is not None and (rec.start, rec.stop) == (shard.start, shard.stop):
                lock.release()
                shard.status, shard.sha256, shard.nbytes = "committed", rec.sha256, rec.nbytes
                return False
            self.storage.remove(commit_path(shard.index))
            self.backend.remove_shard(self.storage, self.manifest, shard)
            for key in self._leftovers.pop(shard.index, []):
                self.storage.remove(key)
        except BaseException:
            lock.release()
            raise
        self._held[shard.index] = lock
        return True

    def submit(self, shard: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
        """Queue a whole shard; blocks while the queue is full (bounded memory)."""
        self._raise_error()
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
            lock = self._held.pop(shard.index, None)
            try:
                self.backend.write_shard(self.storage, self.manifest, shard, arrays)
                shard.sha256 = shard_checksum(arrays)
                shard.nbytes = object_sizes(self.storage, self.manifest, shard)
                if getattr(lock, "lost", False):
                    raise RuntimeError(f"the lease of shard {shard.index} was lost (renewals failed) while writing it; "
                                       "re-run stage 1 with the same config")
                write_commit(self.storage, shard)  # the shard counts from here on
                shard.status = "committed"
                self.written.append(shard.index)
            except BaseException as e:  # surfaced to the producer on its next submit / at exit
                where = getattr(e, "filename", None) or f"{self.storage.url} (shard {shard.index}, rows {shard.start}:{shard.stop})"
                self._error = explain_os_error(e, where, WRITE_FIX)
            finally:
                self._release(lock)

    @staticmethod
    def _release(lock: Lock | None) -> None:
        if lock is None:
            return
        try:
            lock.release()
        except Exception as e:  # noqa: BLE001 - never let the writer thread die on a release
            log.warning("could not release lock %s: %s", lock.name, e)

    def _raise_error(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, StorageError):  # already one clear line
            raise e
        raise RuntimeError(f"the cache writer failed: {e}") from e

    def __enter__(self) -> CacheWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        for lock in self._held.values():  # claimed, never submitted (the producer failed)
            self._release(lock)
        self._held.clear()
        if exc_type is not None:
            log.warning("capture interrupted; re-run with the same config to resume from the committed shards")
            return
        self._raise_error()
        self.finalize()

    def finalize(self) -> bool:
        """Mark the cache complete if every shard of every worker is committed: judged from
        the commit records as they are now, not from what this process saw at its start
        (another process may have uncommitted a damaged shard meanwhile)."""
        with self.storage.lock("cache"):
            for shard in self.manifest.shards:
                shard.status, shard.sha256, shard.nbytes = "pending", None, None
            merge_commits(self.manifest, read_commits(self.storage, []), strict=False)
            missing = self.manifest.missing_shards()
            if missing:
                if self.world_size == 1:
                    raise RuntimeError(f"capture ended with shards {missing} unwritten; re-run stage 1 to finish")
                log.info("rank %d done; %d shard(s) of other workers still pending", self.rank, len(missing))
                return False
            self.manifest.complete = True
            write_manifest(self.storage, self.manifest)  # the last write: the cache is now complete
        return True
