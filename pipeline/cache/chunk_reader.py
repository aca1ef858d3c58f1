"""Decoding this project's own Zarr chunks directly, for the stream's hot path.

zarr-python 3.1.6 spends about 1 ms of CPU per read call whatever its size (its codec
pipeline and event-loop hand-offs), more than decoding a 2 MB chunk. The caches written
here have one fixed layout: ``sharding_indexed`` with the index at the end of each shard
(``bytes`` + ``crc32c``) and inner chunks ``bytes`` (little-endian), optionally ``zstd``,
then ``crc32c``. For arrays with exactly that layout, a chunk is its bytes in the shard
object (memory-mapped locally: the page cache read in place, no copy into a read buffer;
one ranged read from object storage), a crc32c check and (for zstd) one decompression,
then one copy into the caller's buffer. Anything else (another layout, a chunk never
written) returns False and the caller goes through zarr. Checksums are always verified: a
mismatch raises, naming the object.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import google_crc32c
import numpy as np
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from pipeline.cache.format import GROUP, CacheDamaged
from pipeline.cache.storage import Storage
from pipeline.hashing import plain

_MISSING = np.uint64(2**64 - 1)


def _crc_ok(data: np.ndarray) -> bool:
    """``data`` (uint8) ends with the little-endian crc32c of the rest."""
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:].tobytes(), "little")


def plain_layout(array) -> tuple[tuple[int, ...], bool] | None:
    """(inner chunk shape, zstd?) when ``array`` has the layout above, else None."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    inner, index = list(sc.codecs), list(sc.index_codecs)
    if plain(sc.index_location) != "end":
        return None
    if not (len(index) == 2 and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)):
        return None
    little = isinstance(inner[0], BytesCodec) and plain(inner[0].endian) in (
        "little", None)
    zstd = len(inner) == 3 and isinstance(inner[1], ZstdCodec)
    if not (little and isinstance(inner[-1], Crc32cCodec) and len(inner) == (3 if zstd else 2)):
        return None
    return tuple(sc.chunk_shape), zstd


class ChunkReader:
    """Rows of one array, read chunk by chunk from its shard objects (see the module doc)."""

    def __init__(self, storage: Storage, name: str, array, layout: tuple[tuple[int, ...], bool], keep: int = 4096,
                 keep_maps: int = 8):
        self.storage, self.name, self.dtype, self.rows = storage, name, np.dtype(array.dtype), array.shape[0]
        self.chunk_shape, self.zstd = layout
        self.shard_rows = array.metadata.chunk_grid.chunk_shape[0]
        self.per_shard = self.shard_rows // self.chunk_shape[0]
        self.suffix = "/0" * (array.ndim - 1)
        self.indexes: OrderedDict[int, np.ndarray] = OrderedDict()  # the last `keep` shard indexes (16 B/chunk)
        self.keep, self.keep_maps = keep, keep_maps
        # local shard objects memory-mapped, the last few kept (an evicted map is unmapped when
        # the last view of it, perhaps another thread's, goes: never closed under a reader)
        self.maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self.codec = Zstd() if self.zstd else None

    def _key(self, shard: int) -> str:
        return f"{GROUP}/{self.name}/c/{shard}{self.suffix}"

    def _path(self, shard: int) -> str:
        return self.storage.path(self._key(shard))

    def _damaged(self, shard: int, rows: tuple[int, int], what: str) -> CacheDamaged:
        return CacheDamaged(self.storage.url, self.name, self._key(shard), (rows[0], min(rows[1], self.rows)), what)

    def _bytes(self, shard: int, start: int, stop: int | None) -> np.ndarray:
        """Bytes ``[start, stop)`` of a shard object (``start < 0``: the last ``-start``), as
        uint8: a view of the memory-mapped object locally (each object opened once, the last
        ``keep_maps`` kept), else one ranged read. Fewer bytes where the object is shorter."""
        path = self._path(shard)
        if not self.storage.local:
            if start < 0:
                size = self.storage.fs.size(path)
                start, stop = size + start, size
            return np.frombuffer(self.storage.fs.cat_file(path, start=start, end=stop), dtype=np.uint8)
        if shard not in self.maps:
            self.maps[shard] = np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.empty(0, np.uint8)
            while len(self.maps) > self.keep_maps:
                self.maps.popitem(last=False)
        self.maps.move_to_end(shard)
        return self.maps[shard][start:stop]

    def _index(self, shard: int) -> np.ndarray:
        if shard not in self.indexes:
            try:
                raw = self._bytes(shard, -(self.per_shard * 16 + 4), None)
            except (FileNotFoundError, OSError) as e:
                raise self._damaged(shard, (shard * self.shard_rows, (shard + 1) * self.shard_rows),
                                    f"the shard object cannot be read ({e})") from e
            if len(raw) != self.per_shard * 16 + 4 or not _crc_ok(raw):
                raise self._damaged(shard, (shard * self.shard_rows, (shard + 1) * self.shard_rows),
                                    "the shard index does not match its crc32c checksum (cut or overwritten)")
            # a copy: a view would hold the shard's map (and its file) open as long as the index
            self.indexes[shard] = raw[:-4].view("<u8").reshape(self.per_shard, 2).copy()
            while len(self.indexes) > self.keep:
                self.indexes.popitem(last=False)
        self.indexes.move_to_end(shard)
        return self.indexes[shard]

    def _bad_chunk(self, shard: int, start: int) -> CacheDamaged:
        """The chunk holding row ``start`` does not match its checksum."""
        rows = self.chunk_shape[0]
        first = (start // rows) * rows
        return self._damaged(shard, (first, first + rows),
                             f"chunk {(start // rows) % self.per_shard} does not match its crc32c checksum")

    def read(self, start: int, stop: int, out: np.ndarray) -> bool:
        """Rows ``[start, stop)``, inside one inner chunk, into ``out``; False: not handled."""
        rows = self.chunk_shape[0]
        if start // rows != (stop - 1) // rows:
            return False
        shard, inner = divmod(start // rows, self.per_shard)
        offset, nbytes = self._index(shard)[inner]
        if offset == _MISSING:
            return False  # never written: zarr gives the fill value (NaN), which the stream names
        raw = self._bytes(shard, int(offset), int(offset + nbytes))
        if len(raw) != nbytes or not _crc_ok(raw):
            raise self._bad_chunk(shard, start)
        payload = np.frombuffer(self.codec.decode(raw[:-4]), dtype=np.uint8) if self.codec else raw[:-4]
        chunk = payload.view(self.dtype.newbyteorder("<")).reshape(self.chunk_shape)
        lo = start - (start // rows) * rows
        out[...] = chunk[lo:lo + stop - start]
        return True
