"""Zarr v3 backend: one group (``zarr/`` inside the cache folder), arrays chunked by rows, the sharding codec (one object
per shard), crc32c on every chunk and on each shard's index, zstd.

A stock ``zarr.open_group("<cache>/zarr")`` reads it; bfloat16 arrays are stored as their uint16
bit pattern (NumPy has no bfloat16) with ``logical_dtype: bfloat16`` in their attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

from pipeline.cache.chunk_reader import ChunkReader, plain_layout
from pipeline.cache.decode import bf16_arrays
from pipeline.cache.format import (
    GROUP,
    IDS,
    TOPK_VAL,
    CacheDamaged,
    Manifest,
    ShardRecord,
    array_specs,
)
from pipeline.cache.storage import Storage

if TYPE_CHECKING:
    import dask.array as da


def create(storage: Storage, m: Manifest, zstd_level: int, missing_only: bool = False) -> None:
    """The group and its arrays (``missing_only``: only arrays whose metadata is gone; an
    existing array is never recreated, which would drop its data)."""
    have = storage.listing() if missing_only else {}
    group = zarr.open_group(storage.zarr_store(GROUP), mode="a")
    for name, (shape, dtype) in array_specs(m).items():
        if f"{GROUP}/{name}/zarr.json" in have:
            continue
        # an adaptive top-k's values too: their -inf padding then costs next to nothing
        zstd = (m.compression == "all" or (m.compression == "ints" and not dtype.startswith("float"))
                or (m.top_p > 0 and name == TOPK_VAL and m.compression != "none"))
        compressors = [ZstdCodec(level=zstd_level), Crc32cCodec()] if zstd else [Crc32cCodec()]
        logical = "bfloat16" if name in bf16_arrays(m) else dtype
        # never-written float rows read back as NaN, never as plausible zeros
        fill = float("nan") if dtype.startswith("float") else (-1 if name == IDS else 0)
        group.create_array(name, shape=(m.rows, *shape), dtype=dtype, chunks=(m.chunk_rows, *shape),
                           shards=(m.shard_rows, *shape), compressors=compressors, fill_value=fill,
                           overwrite=not missing_only, attributes={"logical_dtype": logical})


def write_shard(storage: Storage, m: Manifest, shard: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
    """Write one whole shard of every array: a shard-aligned slice, so each shard object
    is written once, by one writer (partial writes of one shard from two processes lose data)."""
    group = zarr.open_group(storage.zarr_store(GROUP), mode="r+")
    for name, values in arrays.items():
        group[name][shard.start:shard.stop] = values


def shard_objects(m: Manifest, shard: ShardRecord) -> list[str]:
    """The store keys holding one shard of every array (default chunk key encoding)."""
    return [_key(name, shape, shard.index) for name, (shape, _) in array_specs(m).items()]


def _key(name: str, shape: tuple[int, ...], index: int) -> str:
    return f"{GROUP}/{name}/c/{index}" + ("/0" if shape else "")


def _read_rows(storage: Storage, array, name: str, start: int, stop: int, shard_rows: int, out=None):
    """Rows of one array through zarr, a decoding failure named by array, object and rows."""
    try:
        if out is None:
            return array[start:stop]
        out[...] = array[start:stop]
        return out
    except Exception as e:  # zarr's checksum / decode errors name nothing
        index = start // shard_rows
        raise CacheDamaged(storage.url, name, _key(name, array.shape[1:], index), (start, stop),
                           f"cannot be decoded ({type(e).__name__}: {e})") from e


def remove_shard(storage: Storage, m: Manifest, shard: ShardRecord) -> None:
    for key in shard_objects(m, shard):
        storage.remove(key)


def read_shard(storage: Storage, m: Manifest, shard: ShardRecord) -> dict[str, np.ndarray]:
    group = zarr.open_group(storage.zarr_store(GROUP, read_only=True), mode="r")
    return {name: _read_rows(storage, group[name], name, shard.start, shard.stop, m.shard_rows)
            for name in array_specs(m)}


def block_reader(storage: Storage, m: Manifest):
    """``read(requests)``: for each ``(name, start, stop, out)``, rows ``[start, stop)`` of one
    array decoded straight into ``out`` (stored dtype). Arrays in this project's own layout
    are decoded chunk by chunk without zarr's per-call machinery (:mod:`chunk_reader`); the
    rest go through zarr, into ``out`` too, in one hand-off to its event loop per call."""
    group = zarr.open_group(storage.zarr_store(GROUP, read_only=True), mode="r")
    arrays = {name: group[name] for name in array_specs(m)}
    handles = {name: a.async_array for name, a in arrays.items()}
    direct = {name: ChunkReader(storage, name, a, layout) for name, a in arrays.items()
              if (layout := plain_layout(a)) is not None}

    async def read_all(requests) -> None:
        for name, start, stop, out in requests:
            await handles[name].get_orthogonal_selection((slice(start, stop),), out=NDBuffer.from_ndarray_like(out))

    def read(requests: list[tuple[str, int, int, np.ndarray]]) -> None:
        rest = [r for r in requests if not (r[0] in direct and direct[r[0]].read(*r[1:]))]
        if rest:
            try:
                sync(read_all(rest))
            except Exception:  # name the failing piece: read them one at a time through zarr
                for name, start, stop, out in rest:
                    _read_rows(storage, arrays[name], name, start, stop, m.shard_rows, out)

    return read


class RowSource:
    """An array-like over one array of a cache for ``dask.array.from_array``: whole-row
    slices are decoded chunk by chunk by :class:`ChunkReader` (this project's layout), the
    rest (other selections, other layouts, unwritten chunks) by zarr. Picklable for the
    distributed scheduler: the decoder is rebuilt in each process."""

    def __init__(self, storage: Storage, name: str, array, shard_rows: int):
        self.storage, self.name, self.array, self.shard_rows = storage, name, array, shard_rows
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.layout = plain_layout(array)
        self._reader: ChunkReader | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def _whole_rows(self, key) -> tuple[int, int] | None:
        """(start, stop) when ``key`` selects whole rows with step 1, else None."""
        key = key if isinstance(key, tuple) else (key,)
        if self.layout is None or not key or not isinstance(key[0], slice):
            return None
        if not all(isinstance(k, slice) and k.indices(n) == (0, n, 1) for k, n in zip(key[1:], self.shape[1:], strict=False)):
            return None
        start, stop, step = key[0].indices(self.shape[0])
        return (start, stop) if step == 1 else None

    def __getitem__(self, key):
        rows = self._whole_rows(key)
        if rows is None:
            key0 = (key if isinstance(key, tuple) else (key,))[0]
            start, stop, _ = key0.indices(self.shape[0]) if isinstance(key0, slice) else (0, self.shape[0], 1)
            try:
                return self.array[key]
            except Exception as e:
                raise CacheDamaged(self.storage.url, self.name, _key(self.name, self.shape[1:],
                                   start // self.shard_rows), (start, stop),
                                   f"cannot be decoded ({type(e).__name__}: {e})") from e
        if self._reader is None:
            self._reader = ChunkReader(self.storage, self.name, self.array, self.layout)
        start, stop = rows
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        size, a = self.layout[0][0], start
        while a < stop:  # piece by piece, split at chunk boundaries
            b = min((a // size + 1) * size, stop)
            if not self._reader.read(a, b, out[a - start:b - start]):
                _read_rows(self.storage, self.array, self.name, a, b, self.shard_rows, out[a - start:b - start])
            a = b
        return out


def dask_arrays(storage: Storage, m: Manifest) -> dict[str, da.Array]:
    """One Dask block per Zarr chunk, read by :class:`RowSource`."""
    import dask.array as da  # (here: stage 1 writes without it, and starts a second sooner)
    from dask.base import tokenize

    group = zarr.open_group(storage.zarr_store(GROUP, read_only=True), mode="r")
    out = {}
    for name, (shape, _) in array_specs(m).items():
        source = RowSource(storage, name, group[name], m.shard_rows)
        token = tokenize(storage.url, name, m.fingerprint.get("digest"), [(s.index, s.sha256) for s in m.shards])
        out[name] = da.from_array(source, chunks=(m.chunk_rows, *shape), asarray=False, lock=False,
                                  name=f"cache-{name}-{token}", meta=np.empty((0,) * (1 + len(shape)), group[name].dtype))
    return out
