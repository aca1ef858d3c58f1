"""Commit records: one small file per committed shard under ``commits/``, written after the
shard itself by the one worker that owns it, and folded into the manifest by the last worker
to finish (or by a reader of an unfinished capture, to see its progress)."""

from __future__ import annotations

import json
from dataclasses import asdict

from pipeline.cache.format import COMMITS, REPAIR, Manifest, ShardRecord
from pipeline.cache.storage import Storage
from pipeline.errors import CacheError


def commit_path(index: int) -> str:
    return f"{COMMITS}/shard-{index:05d}.json"


def write_commit(storage: Storage, shard: ShardRecord) -> None:
    """Record one shard as whole. One file per shard: concurrent writers never share one."""
    storage.write_atomic(json.dumps(asdict(shard)).encode(), commit_path(shard.index))


def parse_commit(data: bytes) -> ShardRecord:
    """A commit record's bytes as a ShardRecord; ValueError/TypeError when damaged."""
    return ShardRecord(**json.loads(data))


def read_commit(storage: Storage, index: int) -> ShardRecord | None:
    """Shard ``index``'s commit record as it is now; None when absent or unreadable."""
    path = commit_path(index)
    if not storage.exists(path):
        return None
    try:
        return parse_commit(storage.read_bytes(path))
    except (ValueError, TypeError):
        return None


def read_commits(storage: Storage, bad: list[int] | None = None) -> dict[int, ShardRecord]:
    """Shard commit records written so far (an unfinished capture's progress). An
    unreadable record is an error naming it, or with ``bad`` given, its shard index is
    appended there and the record left out (the writer captures that shard again)."""
    if not storage.exists(COMMITS):
        return {}
    out = {}
    for path in storage.fs.glob(storage.path(COMMITS, "shard-*.json")):
        try:
            rec = parse_commit(storage.fs.cat_file(path))
        except (ValueError, TypeError) as e:
            if bad is None:
                raise CacheError(f"commit record {path} is damaged ({e}): {REPAIR}") from e
            bad.append(int(path.rsplit("shard-", 1)[1].split(".")[0]))
            continue
        out[rec.index] = rec
    return out


def merge_commits(m: Manifest, commits: dict[int, ShardRecord], strict: bool = True) -> list[int]:
    """Mark every committed shard of ``m`` (status, sha256, object sizes), after checking
    each record covers the planned rows. A record that does not: an error, or with
    ``strict=False`` left out and its index returned (the writer captures it again)."""
    bad = []
    for shard in m.shards:
        rec = commits.get(shard.index)
        if rec is None:
            continue
        if (rec.start, rec.stop) != (shard.start, shard.stop):
            if strict:
                raise CacheError(f"commit record of shard {shard.index} covers rows {rec.start}:{rec.stop}, the "
                                 f"manifest plans {shard.start}:{shard.stop}: the cache is damaged: {REPAIR}")
            bad.append(shard.index)
            continue
        shard.status, shard.sha256, shard.nbytes = "committed", rec.sha256, rec.nbytes
    return bad
