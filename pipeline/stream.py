"""Streaming a cache in bounded memory, in a seeded order: one read path for every task.

:class:`CacheRows` is that path: rows of the cache's arrays decoded straight into the
caller's buffers through the backends (Zarr chunks in this project's own layout by
:mod:`pipeline.cache.chunk_reader`), every float row checked for NaN and infinity and a
bad one named. Two streams are built on it:

- :class:`CacheStream` (rows are samples): shuffled windows of blocks, below;
- :class:`pipeline.sequence_stream.SequenceStream` (rows are tokens, ``offsets`` map sequences to rows): whole
  sequences in a seeded order, laid out on the padded (B, L) grid a causal student reads.

:class:`CacheStream`:

An epoch's order: the cache's blocks (its Zarr chunks / Arrow record batches, which are
also the chunks of the reader's Dask arrays) restricted to the selected splits are
permuted with ``(seed, epoch)``; consecutive groups of ``shuffle_window`` blocks are read
together and their rows permuted again. Batches are consecutive slices of that row
sequence, so the position (batches served) is all a resumed stream needs: it skips the
windows already consumed without reading them.

A background thread reads ahead up to ``prefetch`` windows, each block decoded straight
into a reused window buffer (a ring of ``prefetch + 2``), so memory held is about
``(prefetch + 2) * shuffle_window`` blocks whatever the cache's size. The stream reads
through the backends (Zarr chunks in this project's own layout by
:mod:`pipeline.cache.chunk_reader`) rather than computing Dask blocks: a Dask block is a
freshly allocated array that then has to be copied into its window, and zarr-python's
per-call cost exceeds the decoding itself (bench/stream.py). Whole-cache jobs (audit,
derive, verify) run on Dask.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.cache import CacheReader
from pipeline.cache.backends import backend
from pipeline.cache.decode import bf16_arrays, decode_rows, decoders
from pipeline.cache.format import (
    IDS,
    REPAIR,
    TOPK_VAL,
    CacheDamaged,
    array_specs,
)
from pipeline.errors import CacheError, ConfigError
from pipeline.kernels._base import all_finite


@dataclass
class Block:
    index: int  # block index (the Dask chunk index along rows)
    start: int  # first row of the block in the cache
    lo: int  # selected rows within the block: [lo, hi)
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def background(items: Iterator, size: int) -> Iterator:
    """Iterate ``items`` on a background thread, up to ``size`` ahead. The consumer gets
    the producer's exception; closing the consumer stops the producer at its next item."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        """Hand ``item`` over unless the consumer has gone (a bare put could block forever)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


class Resumable:
    """Epoch and position (batches served in it) under a fixed seed: all a stream needs to
    yield exactly the rest of an epoch after a restart."""

    seed: int
    epoch: int = 0
    position: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ConfigError(f"stream state was saved with seed={state['seed']}, this stream has seed={self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _bad_rows(a: np.ndarray, bf16: bool, zero_ok: bool = False) -> np.ndarray | None:
    """Indices of rows holding a NaN or infinity (None when all are finite); with
    ``zero_ok``, -inf (a probability of 0: adaptive top-k padding) is allowed."""
    if bf16:  # stored as bfloat16 bit patterns: an all-ones exponent is inf or NaN
        bad = ((a & 0x7F80) == 0x7F80) & ~(zero_ok & (a.view(np.uint16) == 0xFF80))
        bad = bad.reshape(len(a), -1).any(axis=1)
    elif a.dtype.kind == "f" and not all_finite(a):
        bad = ~(np.isfinite(a) | (zero_ok & np.isneginf(a))).reshape(len(a), -1).all(axis=1)
    else:
        return None
    return np.nonzero(bad)[0] if bad.any() else None


def check_finite(arrays: dict[str, np.ndarray], path: str, bf16: set[str] = frozenset(), rows=None,
                 what: str = "ids") -> None:
    """Refuse NaN or infinity in any float array, naming the ``ids`` of the bad rows (and
    their cache rows, when ``rows`` gives each buffer row's cache row)."""
    for name, a in arrays.items():
        bad = _bad_rows(a, name in bf16, zero_ok=name == TOPK_VAL)
        if bad is not None:
            where = f" (cache rows {np.asarray(rows)[bad[:10]].tolist()})" if rows is not None else ""
            raise CacheError(f"cache {path!r}: non-finite {name} at {what} {arrays[IDS][bad[:10]].tolist()}"
                             f"{' ...' if len(bad) > 10 else ''}{where} ({len(bad)} rows); never-written rows read "
                             f"as NaN: {REPAIR}")


def split_at_chunks(name: str, start: int, stop: int, out: np.ndarray, chunk_rows: int) -> list[tuple]:
    """Read requests for rows ``[start, stop)`` of one array into ``out``, cut where the
    cache's chunks (Zarr chunks, Arrow record batches) end: each request lies in one chunk."""
    requests, a = [], start
    while a < stop:
        b = min((a // chunk_rows + 1) * chunk_rows, stop)
        requests.append((name, a, b, out[a - start:b - start]))
        a = b
    return requests


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


class CacheRows(Resumable):
    """The read path under both streams: the selected arrays (``ids`` always first), the
    backend's block reader, their stored shapes and dtypes, and which are bfloat16 bits."""

    def __init__(self, reader: CacheReader, arrays: tuple[str, ...] | None, prefetch: int = 1):
        self.reader = reader
        self.arrays = (IDS, *[a for a in (reader.arrays if arrays is None else arrays) if a != IDS])
        unknown = [a for a in self.arrays if a not in reader.arrays]
        if unknown:
            raise CacheError(f"cache {reader.path!r} has no arrays {unknown} (modes {reader.manifest.modes}); "
                             f"it has {sorted(reader.arrays)}")
        if prefetch < 1:
            raise ConfigError(f"prefetch={prefetch}: must be >= 1 (the ring of prefetch + 2 window buffers is sized by it)")
        m = reader.manifest
        self.prefetch = prefetch
        self._read = backend(m.backend).block_reader(reader.storage, m)
        # decoded per batch as readers see them (pipeline/cache/decode.py); what a decoder reads
        # beside its array (quantized values: their rows' largest and step) is read, then dropped
        self._decoders = {n: d for n, d in decoders(m).items() if n in self.arrays}
        self._drop = [e for d in self._decoders.values() for e in d.extras if e not in self.arrays]
        self.arrays = (*self.arrays, *self._drop)
        self._specs = {n: array_specs(m)[n] for n in self.arrays}  # stored row shape and dtype
        self._bf16 = bf16_arrays(m) & set(self.arrays)  # stored as bits: checked as bits

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of the selected arrays, in memory: read in one call straight
        into one new buffer each, checked and decoded as every batch is (no Dask blocks to
        concatenate)."""
        m = self.reader.manifest
        if not 0 <= start <= stop <= m.rows:
            raise ValueError(f"rows {start}:{stop} are outside cache {self.reader.path!r} (0:{m.rows})")
        out = {n: np.empty((stop - start, *shape), dt) for n, (shape, dt) in self._specs.items()}
        self._read([r for n in self.arrays for r in split_at_chunks(n, start, stop, out[n], m.chunk_rows)])
        check_finite(out, self.reader.path, self._bf16, np.arange(start, stop))
        return self._decode(out)

    def _decode(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decode_rows(arrays, self._decoders)
        for n in self._drop:
            del arrays[n]
        return arrays


class CacheStream(CacheRows):
    """Iterate batches of a cache (dicts of row-aligned arrays), one seeded epoch at a time."""

    def __init__(self, reader: CacheReader, *, splits: tuple[str, ...], batch_size: int, seed: int,
                 shuffle_window: int = 8, prefetch: int = 4, arrays: tuple[str, ...] | None = None):
        super().__init__(reader, arrays, prefetch)
        self.blocks = select_blocks(reader, splits)
        self.rows = sum(b.rows for b in self.blocks)
        self._window_rows = shuffle_window * max(reader.ids.chunks[0], default=0)
        self._buffers: list[dict[str, np.ndarray]] = []  # the ring, allocated on first use
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.epoch = 0
        self.position = 0  # batches served in the current epoch

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def _windows(self, epoch: int) -> list[list[Block]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.blocks[i] for i in rng.permutation(len(self.blocks))]
        w = self.shuffle_window
        return [order[i:i + w] for i in range(0, len(order), w)]

    def _buffer(self, k: int) -> dict[str, np.ndarray]:
        """Window buffer ``k`` of the ring. ``prefetch + 2`` suffice: while window k is filled,
        at most ``prefetch`` wait in the queue and the consumer gathers from one more."""
        slot = k % (self.prefetch + 2)
        while len(self._buffers) <= slot:
            self._buffers.append({n: np.empty((self._window_rows, *shape), dtype=dt)
                                  for n, (shape, dt) in self._specs.items()})
        return self._buffers[slot]

    def _read_window(self, epoch: int, k: int, window: list[Block]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The window's rows (cache order, views of a ring buffer) and their seeded permutation."""
        buf, n, requests = self._buffer(k), 0, []
        for b in window:
            requests += [(name, b.start + b.lo, b.start + b.hi, buf[name][n:n + b.rows]) for name in self.arrays]
            n += b.rows
        try:
            self._read(requests)  # the whole window in one call
        except Exception:
            for b in window:  # again block by block, to name the rows that fail
                self._read_block(b, [r for r in requests if r[1] == b.start + b.lo])
        arrays = {name: a[:n] for name, a in buf.items()}
        check_finite(arrays, self.reader.path, self._bf16)
        perm = np.random.default_rng([self.seed, epoch, k]).permutation(n)
        return arrays, perm

    def _read_block(self, b: Block, requests: list) -> None:
        try:
            self._read(requests)
        except CacheDamaged:
            raise  # names the array, the object and the rows already
        except Exception as e:  # anything else says nothing of where: say it
            rows = f"{b.start + b.lo}:{b.start + b.hi}"
            raise CacheError(f"cache {self.reader.path!r}: reading rows {rows} "
                             f"({self.reader.describe_rows(b.start + b.lo)}) failed: {e}; {REPAIR}") from e

    def _take(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Gather ``rows`` of every array (a copy: the window buffer is reused)."""
        return self._decode({n: np.take(a, rows, axis=0) for n, a in arrays.items()})  # np.take: 1.5x a[rows]

    def _ahead(self, epoch: int, skip_rows: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Each window's rows and permutation from the resume point on (run in the background)."""
        done = 0
        for k, window in enumerate(self._windows(epoch)):
            n = sum(b.rows for b in window)
            if done + n <= skip_rows:
                done += n
                continue  # consumed before the resume point: never read
            arrays, perm = self._read_window(epoch, k, window)
            yield arrays, perm[max(skip_rows - done, 0):]
            done += n

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the rest of the current epoch as dicts of arrays (``ids`` and the
        selected cache arrays, row-aligned), then advance to the next epoch."""
        epoch, bs = self.epoch, self.batch_size
        carry: dict[str, np.ndarray] | None = None  # rows short of a batch at a window's end
        for arrays, perm in background(self._ahead(epoch, self.position * bs), self.prefetch):
            i = 0
            if carry is not None:  # top the carried rows up from this window's first rows
                i = min(bs - len(carry[IDS]), len(perm))
                top = self._take(arrays, perm[:i])
                carry = {n: np.concatenate([carry[n], top[n]]) for n in top}
                if len(carry[IDS]) < bs:
                    continue
                self.position += 1
                yield carry
                carry = None
            while len(perm) - i >= bs:
                take = perm[i:i + bs]
                i += bs
                self.position += 1
                yield self._take(arrays, take)
            if i < len(perm):
                carry = self._take(arrays, perm[i:])
        if carry is not None and len(carry[IDS]):
            self.position += 1
            yield carry
        self.epoch, self.position = epoch + 1, 0
