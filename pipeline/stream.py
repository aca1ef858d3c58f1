"""Streaming a cache in bounded memory, in a seeded order of the reader's choosing.

An epoch's order: the cache's blocks (Zarr chunks) restricted to the selected splits are
permuted with ``(seed, epoch)``; consecutive groups of ``shuffle_window`` blocks are read
together and their rows permuted again. Batches are consecutive slices of that row
sequence, so the position (batches served) is all a resumed stream needs: it skips the
windows already consumed without reading them. A background thread reads ahead up to
``prefetch`` windows through Dask's synchronous scheduler. Memory held is about
``(prefetch + 2) * shuffle_window`` blocks, whatever the cache's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from dask.local import get_sync
from dask.optimization import cull

from pipeline.cache import CacheReader
from pipeline.cache.format import IDS
from pipeline.kernels._base import all_finite


@dataclass
class Block:
    index: int  # Dask block index
    start: int  # first row of the block in the cache
    lo: int  # selected rows within the block: [lo, hi)
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def _check_finite(arrays: dict[str, np.ndarray], path: str) -> None:
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not all_finite(a):
            bad = np.nonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0]
            raise ValueError(f"cache {path!r}: non-finite {name} at ids {arrays[IDS][bad[:10]].tolist()}"
                             f"{' ...' if len(bad) > 10 else ''} ({len(bad)} rows); never-written rows read as NaN: "
                             "re-run stage 1 to finish or rebuild the cache")


def select_blocks(reader: CacheReader, splits: tuple[str, ...]) -> list[Block]:
    """Blocks overlapping the row ranges of ``splits`` within committed shards, trimmed."""
    ranges = sorted(reader.split_range(s) for s in splits)
    committed = [(s.start, s.stop) for s in reader.manifest.shards if s.status == "committed"]
    ranges = [(max(a, c), min(b, d)) for a, b in ranges for c, d in committed if max(a, c) < min(b, d)]
    blocks, start = [], 0
    for i, size in enumerate(reader.ids.chunks[0]):
        stop = start + size
        for lo, hi in ranges:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                blocks.append(Block(i, start, a - start, b - start))
        start = stop
    return blocks


class CacheStream:
    """Iterate batches of a cache (dicts of row-aligned arrays), one seeded epoch at a time."""

    def __init__(self, reader: CacheReader, *, splits: tuple[str, ...], batch_size: int, seed: int,
                 shuffle_window: int = 8, prefetch: int = 4, arrays: tuple[str, ...] | None = None):
        self.reader = reader
        self.arrays = (IDS, *[a for a in (arrays or reader.arrays) if a != IDS])
        unknown = [a for a in self.arrays if a not in reader.arrays]
        if unknown:
            raise ValueError(f"cache {reader.path!r} has no arrays {unknown}; it has {sorted(reader.arrays)}")
        self.blocks = select_blocks(reader, splits)
        self.rows = sum(b.rows for b in self.blocks)
        self._graph = {}
        for name in self.arrays:
            a = self.reader.arrays[name]
            if a.chunks[1:] and any(len(c) != 1 for c in a.chunks[1:]):
                raise ValueError(f"array {name!r} is chunked along its columns; the stream reads whole rows")
            self._graph.update(dict(a.__dask_graph__()))
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.prefetch = prefetch
        self.epoch = 0
        self.position = 0  # batches served in the current epoch

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"stream state was saved with seed={state['seed']}, this stream has seed={self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _windows(self, epoch: int) -> list[list[Block]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.blocks[i] for i in rng.permutation(len(self.blocks))]
        w = self.shuffle_window
        return [order[i:i + w] for i in range(0, len(order), w)]

    def _read_window(self, epoch: int, k: int, window: list[Block]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The window's rows (concatenated, cache order) and their seeded permutation."""
        names = self.arrays
        keys = [[self._key(n, b) for n in names] for b in window]
        try:  # the Dask graph built once per stream, culled to this window, run synchronously
            parts = self._get(keys)
        except Exception:
            parts = [self._read_block(b, k) for b, k in zip(window, keys, strict=True)]  # name the rows
        arrays = {n: np.concatenate([p[i][b.lo:b.hi] for p, b in zip(parts, window, strict=True)])
                  for i, n in enumerate(names)}
        _check_finite(arrays, self.reader.path)
        perm = np.random.default_rng([self.seed, epoch, k]).permutation(len(arrays[IDS]))
        return arrays, perm

    def _get(self, keys: list):
        """Compute ``keys`` (nested lists) on the synchronous scheduler, over only the tasks
        they need (ordering the whole cache's graph per window cost more than the reads)."""
        flat = [k for ks in keys for k in (ks if isinstance(ks, list) else [ks])]
        return get_sync(cull(self._graph, flat)[0], keys)

    def _key(self, name: str, b: Block) -> tuple:
        a = self.reader.arrays[name]
        return (a.name, b.index) + (0,) * (a.ndim - 1)

    def _read_block(self, b: Block, keys: list):
        try:
            return self._get(keys)
        except Exception as e:  # a checksum or truncation error says nothing of where: say it
            rows = f"{b.start + b.lo}:{b.start + b.hi}"
            raise ValueError(f"cache {self.reader.path!r}: reading rows {rows} "
                             f"({self.reader.describe_rows(b.start + b.lo)}) failed: {e}; "
                             "run stage 2 with verify=true to check every shard") from e

    def _produce(self, epoch: int, skip_rows: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            done = 0
            for k, window in enumerate(self._windows(epoch)):
                n = sum(b.rows for b in window)
                if done + n <= skip_rows:
                    done += n
                    continue  # consumed before the resume point: never read
                arrays, perm = self._read_window(epoch, k, window)
                cut = max(skip_rows - done, 0)
                done += n
                while not stop.is_set():
                    try:
                        out.put((arrays, perm[cut:]), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as e:  # re-raised in the consumer
            out.put(e)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the rest of the current epoch as dicts of arrays (``ids`` and the
        selected cache arrays, row-aligned), then advance to the next epoch."""
        epoch, bs = self.epoch, self.batch_size
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        t = threading.Thread(target=self._produce, args=(epoch, self.position * bs, q, stop), daemon=True)
        t.start()
        try:
            carry: dict[str, np.ndarray] | None = None  # rows short of a batch at a window's end
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                arrays, perm = item
                i = 0
                if carry is not None:  # top the carried rows up from this window's first rows
                    i = min(bs - len(carry[IDS]), len(perm))
                    carry = {n: np.concatenate([carry[n], a[perm[:i]]]) for n, a in arrays.items()}
                    if len(carry[IDS]) < bs:
                        continue
                    self.position += 1
                    yield carry
                    carry = None
                while len(perm) - i >= bs:
                    take = perm[i:i + bs]
                    i += bs
                    self.position += 1
                    yield {n: a[take] for n, a in arrays.items()}
                if i < len(perm):
                    carry = {n: a[perm[i:]] for n, a in arrays.items()}
            if carry is not None and len(carry[IDS]):
                self.position += 1
                yield carry
            self.epoch, self.position = epoch + 1, 0
        finally:
            stop.set()
            t.join()
