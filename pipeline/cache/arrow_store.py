"""Arrow backend: one IPC *file* per shard (``shards/shard-00000.arrow``), one table per
shard, record batches of ``chunk_rows`` rows; 2-D arrays are FixedSizeList columns.

The IPC file format is used, not the stream format: its footer is written last, so a
cut file fails to open instead of reading back short. A shard file is written whole and
moved into place. ``pyarrow.ipc.open_file`` and ``datasets.load_dataset("arrow",
data_files=...)`` read the shards with no project code.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.cache.format import CacheDamaged, Manifest, ShardRecord, array_specs
from pipeline.cache.storage import Storage

if TYPE_CHECKING:
    import dask.array as da

_ARROW = {"int64": pa.int64(), "int32": pa.int32(), "uint16": pa.uint16(), "uint8": pa.uint8(), "float16": pa.float16(),
          "float32": pa.float32()}


def shard_file(index: int) -> str:
    return f"shards/shard-{index:05d}.arrow"


def create(storage: Storage, m: Manifest, zstd_level: int, missing_only: bool = False) -> None:
    storage.makedirs("shards")


def _column(values: np.ndarray, dtype: str) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=_ARROW[dtype])
    return flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def write_shard(storage: Storage, m: Manifest, shard: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
    specs = array_specs(m)
    table = pa.table({name: _column(arrays[name], specs[name][1]) for name in specs})
    sink = io.BytesIO()
    # IPC compression applies to every buffer of a batch: zstd only when asked for everything
    # (and for an adaptive top-k, whose padding it removes)
    zstd = m.compression == "all" or (m.top_p > 0 and m.compression != "none")
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=3) if zstd else None)
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
        for batch in table.to_batches(max_chunksize=m.chunk_rows):
            w.write_batch(batch)
    storage.write_atomic(sink.getvalue(), shard_file(shard.index))


def shard_objects(m: Manifest, shard: ShardRecord) -> list[str]:
    return [shard_file(shard.index)]


def remove_shard(storage: Storage, m: Manifest, shard: ShardRecord) -> None:
    storage.remove(shard_file(shard.index))


def _to_numpy(col: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    if shape:
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape)
    return col.to_numpy(zero_copy_only=False)


def _open(storage: Storage, index: int, rows: tuple[int, int], array: str = "*") -> pa.ipc.RecordBatchFileReader:
    path = storage.path(shard_file(index))
    try:
        source = pa.memory_map(path) if storage.local else pa.BufferReader(storage.fs.cat_file(path))
        return pa.ipc.open_file(source)
    except (pa.ArrowInvalid, OSError) as e:
        raise CacheDamaged(storage.url, array, shard_file(index), rows, f"not a whole Arrow IPC file ({e})") from e


def read_shard(storage: Storage, m: Manifest, shard: ShardRecord) -> dict[str, np.ndarray]:
    try:
        table = _open(storage, shard.index, (shard.start, shard.stop)).read_all()
    except pa.ArrowInvalid as e:
        raise CacheDamaged(storage.url, "*", shard_file(shard.index), (shard.start, shard.stop),
                           f"cannot be decoded ({e})") from e
    return {name: _to_numpy(table.column(name).combine_chunks(), shape)
            for name, (shape, _) in array_specs(m).items()}


def _read_block(storage: Storage, index: int, batch: int, name: str, shape: tuple[int, ...],
                rows: tuple[int, int]) -> np.ndarray:
    return _to_numpy(_open(storage, index, rows, name).get_batch(batch).column(name), shape)


def block_reader(storage: Storage, m: Manifest, keep: int = 4):
    """``read(requests)``: for each ``(name, start, stop, out)``, rows ``[start, stop)`` (inside
    one record batch) of one array copied into ``out``. The last ``keep`` shard files opened stay open (memory-mapped
    locally, held in memory from object storage), so memory does not grow with the cache."""
    specs, files = array_specs(m), OrderedDict()

    def read_one(name: str, start: int, stop: int, out: np.ndarray) -> None:
        shard = m.shards[start // m.shard_rows]
        if shard.index not in files:
            files[shard.index] = _open(storage, shard.index, (shard.start, shard.stop))
            while len(files) > keep:
                files.popitem(last=False)
        files.move_to_end(shard.index)
        j, offset = divmod(start - shard.start, m.chunk_rows)
        col = _to_numpy(files[shard.index].get_batch(j).column(name), specs[name][0])
        out[...] = col[offset:offset + stop - start]

    def read(requests: list[tuple[str, int, int, np.ndarray]]) -> None:
        for request in requests:
            read_one(*request)

    return read


def dask_arrays(storage: Storage, m: Manifest) -> dict[str, da.Array]:
    """One Dask block per record batch (``chunk_rows`` rows), read lazily."""
    import dask.array as da  # (here: stage 1 writes without it)
    from dask import delayed

    out = {}
    for name, (shape, dtype) in array_specs(m).items():
        blocks = []
        for shard in m.shards:
            for j, start in enumerate(range(shard.start, shard.stop, m.chunk_rows)):
                rows = min(m.chunk_rows, shard.stop - start)
                blocks.append(da.from_delayed(delayed(_read_block)(storage, shard.index, j, name, shape, (shard.start, shard.stop)),
                                              shape=(rows, *shape), dtype=np.dtype(dtype)))
        out[name] = da.concatenate(blocks) if blocks else da.zeros((0, *shape), dtype=dtype)
    return out
