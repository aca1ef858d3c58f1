"""Batches of whole sequences from a token cache, for causal LM students.

A causal student needs each sequence's tokens in order, so the unit of shuffling is the
sequence: every epoch takes a permutation of the split's sequences seeded by
``(seed, epoch)``, independent of the order the teacher ran in. A batch's rows are read
from the cache's Dask arrays (``offsets`` give each sequence's row range; one synchronous
compute per batch), one batch ahead on a background thread, and laid out on the padded
(B, L) grid with a mask: padding positions get zero rows and are masked out of every loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import dask
import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.cache.format import IDS
from pipeline.stream import Resumable, background
from pipeline.token_capture import pad_batch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L) teacher-tokenizer ids, right-padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    teacher: dict[str, np.ndarray]  # cache arrays laid out on the grid: (B * L, ...), zeros at padding
    mask: np.ndarray  # (B * L,) bool: real tokens (the rows every loss reads)
    sequences: np.ndarray  # (B,) sequence indices


class SequenceStream(Resumable):
    def __init__(self, reader: CacheReader, tokens: np.ndarray, *, split: str, batch_size: int, seed: int,
                 arrays: tuple[str, ...], prefetch: int = 2):
        self.reader, self.tokens = reader, tokens
        self.offsets = reader.offsets
        lo, hi = reader.split_range(split)
        first, last = np.searchsorted(self.offsets, [lo, hi])
        self.sequence_ids = np.arange(first, last)
        self.arrays = tuple(a for a in arrays if a != IDS)
        missing = [a for a in self.arrays if a not in reader.arrays]
        if missing:
            raise ValueError(f"cache {reader.path!r} has no arrays {missing} (modes {reader.manifest.modes})")
        self.batch_size, self.seed, self.prefetch = batch_size, seed, prefetch
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-len(self.sequence_ids) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        return self.sequence_ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.sequence_ids))]

    def read(self, seqs: np.ndarray) -> SequenceBatch:
        """One batch: the sequences' tokens and cache rows on the padded grid."""
        off = self.offsets
        slices = [self.reader.arrays[n][off[i]:off[i + 1]] for i in seqs for n in (IDS, *self.arrays)]
        parts = iter(dask.compute(*slices, scheduler="sync"))
        input_ids, attention = pad_batch([self.tokens[off[i]:off[i + 1]] for i in seqs], pad_id=0)
        width = input_ids.shape[1]
        grid = {n: np.zeros((len(seqs) * width, *self.reader.arrays[n].shape[1:]), self.reader.arrays[n].dtype)
                for n in self.arrays}
        for j, i in enumerate(seqs):
            ids = next(parts)
            if not (ids == i).all():
                raise ValueError(f"cache {self.reader.path!r}: rows {off[i]}:{off[i + 1]} belong to sequences "
                                 f"{np.unique(ids).tolist()}, not {i}; offsets and rows disagree, re-run stage 1")
            for n in self.arrays:
                grid[n][j * width:j * width + len(ids)] = next(parts)
        return SequenceBatch(input_ids, attention, grid, attention.reshape(-1).numpy().astype(bool), seqs)

    def __iter__(self) -> Iterator[SequenceBatch]:
        """The rest of the current epoch, then advance to the next."""
        order, bs = self.order(self.epoch), self.batch_size
        batches = (self.read(order[a:a + bs]) for a in range(self.position * bs, len(order), bs))
        for item in background(batches, self.prefetch):
            self.position += 1
            yield item
        self.epoch, self.position = self.epoch + 1, 0
