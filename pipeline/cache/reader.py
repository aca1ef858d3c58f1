"""Opening a cache: the manifest is checked (version, completeness, fingerprint) before
any array is touched; arrays come back as lazy Dask arrays chunked like the store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.cache.backends import backend
from pipeline.cache.commits import merge_commits, read_commits
from pipeline.cache.decode import decoders
from pipeline.cache.fingerprint import check_fingerprint
from pipeline.cache.format import (
    IDS,
    LOGITS,
    OFFSETS,
    POSITIONS,
    REPAIR,
    TOKENIZER,
    Manifest,
    read_index_file,
    read_manifest,
)
from pipeline.cache.health import damaged_shards, describe
from pipeline.cache.storage import Storage
from pipeline.errors import CacheError, ConfigError

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)


@dataclass
class CacheReader:
    storage: Storage
    manifest: Manifest
    arrays: dict[str, da.Array]  # lazily read; bfloat16 arrays decoded to float32
    _offsets: np.ndarray | None = None
    _positions: np.ndarray | None = None

    @property
    def path(self) -> str:
        return self.storage.url

    @property
    def ids(self) -> da.Array:
        return self.arrays[IDS]

    @property
    def logits(self) -> da.Array:
        if LOGITS not in self.arrays:
            raise ConfigError(f"cache {self.path!r} holds modes {self.manifest.modes}, not 'full' logits, which this "
                             "step needs (a derive, a dense distance): capture with cache.modes=[full,...]")
        return self.arrays[LOGITS]

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def offsets(self) -> np.ndarray:
        """Sequence caches: sequence i owns rows ``offsets[i]:offsets[i + 1]`` (read once, checked)."""
        if not self.manifest.sequences:
            raise CacheError(f"cache {self.path!r} holds samples, not token sequences (no offsets)")
        if self._offsets is None:
            self._offsets = read_index_file(self.storage, self.manifest, OFFSETS)
        return self._offsets

    @property
    def positions(self) -> np.ndarray | None:
        """Sequence caches whose rows are some of their tokens (chat: the assistant's): row r
        is at token ``positions[r]`` of its sequence. None when every token has a row, in order."""
        if not self.manifest.positions_sha256:
            return None
        if self._positions is None:
            self._positions = read_index_file(self.storage, self.manifest, POSITIONS)
        return self._positions

    @property
    def tokenizer_json(self) -> str | None:
        """Token caches since format 5: the teacher's tokenizer (``tokenizers`` JSON), checked
        against its digest; None where the cache holds none (a cache of samples)."""
        if not self.manifest.tokenizer_sha256:
            return None
        return read_index_file(self.storage, self.manifest, TOKENIZER, raw=True).decode()

    def split_range(self, name: str) -> tuple[int, int]:
        if name not in self.manifest.splits:
            raise KeyError(f"cache {self.path!r} has no split {name!r}; it has {list(self.manifest.splits)}")
        start, stop = self.manifest.splits[name]
        return int(start), int(stop)

    def describe_rows(self, row: int) -> str:
        shard = self.manifest.shards[row // self.manifest.shard_rows]
        return f"shard {shard.index}, rows {shard.start}:{shard.stop}"

    def verify(self) -> None:
        """Re-read every committed shard, decode it (every crc32c checked) and compare its
        sha256 with the commit record's; raise naming every damaged shard."""
        if self.manifest.sequences:
            read_index_file(self.storage, self.manifest, OFFSETS)  # checked against its digest
            if self.manifest.positions_sha256:
                read_index_file(self.storage, self.manifest, POSITIONS)
            if self.manifest.tokenizer_sha256:
                read_index_file(self.storage, self.manifest, TOKENIZER)
        problems = damaged_shards(self.storage, self.manifest, full=True, progress=True)
        if problems:
            raise CacheError(f"cache {self.path!r}: {len(problems)} damaged shard(s):"
                             f"{describe(self.storage, self.manifest, problems)}\n{REPAIR}")


def open_cache(path: str, *, expected: dict | None = None, allow_partial: bool = False,
               storage_options: dict | None = None, num_classes: int | None = None) -> CacheReader:
    """Open the cache at ``path`` (local or fsspec URL). ``num_classes`` is checked first
    (the commonest mistake, with its fix), then the fingerprint fields in ``expected``; an
    incomplete cache is refused (naming the missing shards) unless ``allow_partial``."""
    storage = Storage(path, storage_options)
    m = read_manifest(storage)
    if num_classes is not None and m.num_classes != num_classes:
        raise ConfigError(f"cache {path!r} holds teacher outputs over {m.num_classes} classes, but this run has "
                         f"data.num_classes={num_classes} (the students' output width): set "
                         f"data.num_classes={m.num_classes}, or capture a cache for this data with stage 1")
    if expected is not None:
        check_fingerprint(m.fingerprint, expected, path)
    if not m.complete:
        merge_commits(m, read_commits(storage))
    missing = m.missing_shards()
    if missing and not allow_partial:
        raise CacheError(f"cache {path!r} is incomplete: shards {missing[:20]}{'...' if len(missing) > 20 else ''} "
                         f"of {len(m.shards)} were never committed; run stage 1 again with the same config to finish it")
    if not m.complete and not allow_partial:
        raise CacheError(f"cache {path!r} is not marked complete; re-run stage 1 with the same config to finish it")
    _check_shards_present(storage, m)
    import dask.array as da

    arrays = backend(m.backend).dask_arrays(storage, m)
    stored = dict(arrays)
    for name, d in decoders(m).items():  # as readers see them (pipeline/cache/decode.py)
        a = stored[name]
        arrays[name] = da.map_blocks(d.fn, a, *(stored[e] for e in d.extras), dtype=np.dtype(d.dtype),
                                     chunks=a.chunks if d.width is None else (a.chunks[0], (d.width,)))
    return CacheReader(storage, m, arrays)


def _check_shards_present(storage: Storage, m: Manifest) -> None:
    """Every committed shard's objects exist with the sizes written (one listing), so a
    deleted or cut shard is an error naming it rather than rows of fill values."""
    problems = damaged_shards(storage, m)
    if problems:
        raise CacheError(f"cache {storage.url!r}: {len(problems)} damaged shard(s):"
                         f"{describe(storage, m, problems)}\n{REPAIR}")
