"""Whole sequences from a cache whose rows are tokens (``offsets`` map sequences to rows),
laid out on the padded (B, L) grid a causal student reads, through the same read path as
every stream (:class:`pipeline.stream.CacheRows`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.cache.format import IDS
from pipeline.errors import CacheError, ConfigError
from pipeline.stream import CacheRows, background, check_finite, split_at_chunks


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L) token ids, right-padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    teacher: dict[str, np.ndarray]  # cache arrays laid out on the grid: (B * L, ...), zeros at padding
    mask: np.ndarray  # (B * L,) bool: the positions with a cache row (the rows every loss reads)
    sequences: np.ndarray  # (B,) sequence indices
    # (B * L,) bool: the rows the distillation term reads, where narrower than ``mask`` (a
    # vocabulary map can leave a row nothing to distil; its position is still trained on labels)
    distil_mask: np.ndarray | None = None

    def teacher_mask(self) -> np.ndarray:
        """(B * L,) bool: the positions whose teacher row the distillation term reads."""
        return self.mask if self.distil_mask is None else self.distil_mask

    def label_mask(self) -> torch.Tensor:
        """(B, L - 1) bool: the positions whose next-token prediction is trained and scored (a
        cache row there, and a next token): every real token but the last of a document; in a
        chat, the positions that predict the assistant's tokens."""
        rows = torch.from_numpy(self.mask).view(self.input_ids.shape)
        return rows[:, :-1] & (self.attention_mask[:, 1:] == 1)


def pad_batch(seqs: list[np.ndarray], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) token ids and attention mask (1 = real token), L the longest
    sequence rounded up to a multiple of ``multiple``."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(s)
        mask[i, :len(s)] = 1
    return ids, mask


class SequenceStream(CacheRows):
    """Batches of whole sequences from a cache whose rows are tokens.

    A causal student needs each sequence's tokens in order, so the unit of shuffling is the
    sequence: every epoch takes a permutation of the split's sequences seeded by ``(seed,
    epoch)``. A batch's rows are decoded onto the padded (B, L) grid, each at its token's
    position (zeros where there is no row: padding, and in a chat cache the positions that
    do not predict the assistant; masked out of every loss), through the same reader as
    :class:`CacheStream`, checked the same way, ``prefetch`` batches ahead on a background
    thread. ``tokens`` are the token ids the cache was captured from, sequence i at
    ``tokens[token_offsets[i]:token_offsets[i + 1]]`` (default: the cache's row offsets, when
    every token has a row)."""

    def __init__(self, reader: CacheReader, tokens: np.ndarray, *, split: str, batch_size: int, seed: int,
                 arrays: tuple[str, ...], prefetch: int = 2, rank: int = 0, world_size: int = 1,
                 token_offsets: np.ndarray | None = None):
        super().__init__(reader, arrays, prefetch)
        self.tokens = tokens
        self.offsets, self.positions = reader.offsets, reader.positions
        if token_offsets is None and self.positions is not None:
            raise ValueError(f"cache {reader.path!r} holds rows for some tokens only (a chat cache): pass the "
                             "token data's offsets (token_offsets=data.offsets)")
        self.token_offsets = self.offsets if token_offsets is None else token_offsets
        if len(self.token_offsets) != len(self.offsets):
            raise CacheError(f"cache {reader.path!r} holds {len(self.offsets) - 1} sequences, the token data "
                             f"{len(self.token_offsets) - 1}: the cache was captured from other data; re-run stage 1")
        lo, hi = reader.split_range(split)
        first, last = np.searchsorted(self.offsets, [lo, hi])
        self.sequence_ids = np.arange(first, last)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        if world_size > 1 and len(self) == 0:
            raise ConfigError(f"split {split!r} has {len(self.sequence_ids)} sequences, fewer than one batch of "
                             f"{batch_size} for each of {world_size} processes: lower train.batch_size")

    def __len__(self) -> int:
        """Batches per epoch. Across processes, each batch of each process is its own slice of
        one global batch of ``batch_size * world_size`` sequences, and an epoch's last global
        batch is served only if it is whole (every process must take the same steps)."""
        if self.world_size > 1:
            return len(self.sequence_ids) // (self.batch_size * self.world_size)
        return -(-len(self.sequence_ids) // self.batch_size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ConfigError(f"training state was saved by {state.get('world_size', 1)} processes; this run has "
                             f"{self.world_size}: resume with the same number (its batches are split by it)")
        super().load_state_dict(state)

    def order(self, epoch: int) -> np.ndarray:
        return self.sequence_ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.sequence_ids))]

    def read(self, seqs: np.ndarray) -> SequenceBatch:
        """One batch: the sequences' tokens, and their cache rows on the padded grid."""
        off, tok, m = self.offsets, self.token_offsets, self.reader.manifest
        input_ids, attention = pad_batch([self.tokens[tok[i]:tok[i + 1]] for i in seqs], pad_id=0)
        width = input_ids.shape[1]
        counts = off[seqs + 1] - off[seqs]
        flat = {n: np.zeros((int(counts.sum()), *shape), dt) for n, (shape, dt) in self._specs.items()}
        rows, where, requests, at = [], [], [], 0
        for j, i in enumerate(seqs):
            a, b = int(off[i]), int(off[i + 1])
            rows.append(np.arange(a, b))
            where.append(j * width + (np.arange(b - a) if self.positions is None else self.positions[a:b]))
            for n in self.arrays:
                requests += split_at_chunks(n, a, b, flat[n][at:at + b - a], m.chunk_rows)
            at += b - a
        self._read(requests)
        rows, where = np.concatenate(rows), np.concatenate(where)
        if (flat[IDS] != np.repeat(seqs, counts)).any():
            raise CacheError(f"cache {self.reader.path!r}: the rows of sequences {seqs.tolist()} hold other "
                             "sequence ids; offsets and rows disagree: re-run stage 1")
        check_finite(flat, self.reader.path, self._bf16, rows, what="sequences")
        grid = {}
        for n, (shape, dt) in self._specs.items():
            if n != IDS:
                grid[n] = np.zeros((len(seqs) * width, *shape), dt)
                grid[n][where] = flat[n]
        mask = np.zeros(len(seqs) * width, bool)
        mask[where] = True
        return SequenceBatch(input_ids, attention, self._decode(grid), mask, seqs)

    def __iter__(self) -> Iterator[SequenceBatch]:
        """The rest of the current epoch, then advance to the next."""
        order, bs, step = self.order(self.epoch), self.batch_size, self.batch_size * self.world_size
        starts = range(self.position * step, len(self) * step, step)
        batches = (self.read(order[a + self.rank * bs:a + (self.rank + 1) * bs]) for a in starts)
        for item in background(batches, self.prefetch):
            self.position += 1
            yield item
        self.epoch, self.position = self.epoch + 1, 0
