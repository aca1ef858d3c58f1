"""Is a committed shard still what was written? One check, used by the reader (before
serving rows, and by ``verify``) and by the writer (stage 1 heals what it finds).

Cheap: each of the shard's stored objects exists with the size its commit record gives
(one listing for the whole cache). Full: every array of the shard is read back, decoded
(the crc32c of every chunk and shard index is checked on the way) and its sha256 is
compared with the commit record's.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.cache.backends import backend
from pipeline.cache.format import Manifest, ShardRecord
from pipeline.cache.storage import Storage


def shard_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array of a shard, in name order, as stored."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def object_sizes(storage: Storage, m: Manifest, shard: ShardRecord) -> dict[str, int]:
    """The size of each stored object of a shard just written (recorded in its commit)."""
    return {key: storage.size(key) for key in backend(m.backend).shard_objects(m, shard)}


def shard_problem(storage: Storage, m: Manifest, shard: ShardRecord, listing: dict[str, int],
                  full: bool = False) -> str | None:
    """Why a committed shard cannot be trusted, or None when it passes the check."""
    be = backend(m.backend)
    for key in be.shard_objects(m, shard):
        if key not in listing:
            return f"object {key!r} is missing"
        if shard.nbytes and key in shard.nbytes and listing[key] != shard.nbytes[key]:
            return f"object {key!r} is {listing[key]} bytes, {shard.nbytes[key]} were written"
    if full:
        try:
            arrays = be.read_shard(storage, m, shard)
        except ValueError as e:  # CacheDamaged: names the array and object
            return str(e)
        if shard_checksum(arrays) != shard.sha256:
            return "its arrays do not match the sha256 in its commit record"
    return None


def damaged_shards(storage: Storage, m: Manifest, shards: list[ShardRecord] | None = None,
                   full: bool = False, progress: bool = False, listing: dict[str, int] | None = None) -> dict[int, str]:
    """{shard index: problem} over the committed ``shards`` (default: all)."""
    listing = storage.listing() if listing is None else listing
    todo = [s for s in (m.shards if shards is None else shards) if s.status == "committed"]
    if progress and full:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="verify: shards", unit="shard")
    return {s.index: p for s in todo if (p := shard_problem(storage, m, s, listing, full)) is not None}


def describe(storage: Storage, m: Manifest, problems: dict[int, str]) -> str:
    """One line per damaged shard: its index, rows and what is wrong."""
    lines = [f"shard {i} (rows {m.shards[i].start}:{m.shards[i].stop}): {p}" for i, p in sorted(problems.items())]
    more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
    return "\n  " + "\n  ".join(lines[:20]) + more
