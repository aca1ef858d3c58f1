"""Stage 1 of task=lm: the teacher over packed, padded batches of sequences, and the rows
of a shard (one per real token; padding never reaches the cache)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.sequence_stream import pad_batch
from pipeline.tasks.lm.text import TokenData

log = logging.getLogger(__name__)

TEACHER_WIDTHS = 32  # teacher batches are padded to a multiple of this many tokens


def teacher_logits(model, seqs: list[np.ndarray], pad_id: int, device: torch.device,
                   keep: np.ndarray | None = None) -> torch.Tensor:
    """(B, L, V) logits of right-padded sequences, in the teacher's dtype (bfloat16 ones are
    read as they are by the CPU row pass: no float32 copy); with ``keep`` (indices into the
    flattened (B * L) grid), only those rows, (n, V). L is
    rounded up to a multiple of ``TEACHER_WIDTHS``: a corpus of documents of every length then
    gives the teacher a few distinct shapes, not one per length, so the per-shape caches below
    it (oneDNN's primitives for bf16 on CPU, the allocator's free lists) stop growing after the
    first batches and peak memory does not creep up with the corpus."""
    ids, mask = pad_batch(seqs, pad_id, multiple=TEACHER_WIDTHS)
    out = model(input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True),
                use_cache=False)  # no key/value cache: nothing is generated
    logits = out.logits
    if keep is not None:
        rows = logits.reshape(-1, logits.shape[-1])
        logits = rows if len(keep) == len(rows) else rows[torch.from_numpy(keep).to(device)]
    return logits


def padded_width(n: int) -> int:
    return -(-n // TEACHER_WIDTHS) * TEACHER_WIDTHS


def pack_sequences(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive sequences grouped into teacher batches ``[a, b)`` of at most ``budget``
    tokens once padded (the batch's count times its longest, rounded up to
    ``TEACHER_WIDTHS``); a sequence longer than the budget goes alone. Every batch of a corpus
    of short documents then holds about as many tokens as one of long ones, so the teacher's
    per-batch memory (its (B, L, V) logits) is about the same for every batch, reached in the
    first ones and not a maximum that grows with the number of batches."""
    out, start, width = [], 0, 0
    for j, n in enumerate(lengths):
        w = max(width, padded_width(int(n)))
        if j > start and (j - start + 1) * w > budget:
            out.append((start, j))
            start, w = j, padded_width(int(n))
        width = w
    if len(lengths):
        out.append((start, len(lengths)))
    return out


class TokenRows:
    """The capture engine's rows for a language model: the teacher over the sequences a
    shard overlaps, batch by batch, each sequence's cached positions inside the shard kept
    (every real token of a document; in a chat, those predicting the assistant's tokens)."""

    unit = "tok"

    def __init__(self, model, data: TokenData, batch_size: int, pad_id: int, device: torch.device):
        self.model, self.data, self.pad_id, self.device = model, data, pad_id, device
        self.offsets = data.index.offsets  # sequence i owns cache rows offsets[i]:offsets[i + 1]
        # the padded tokens of batch_size sequences of the longest length, per forward
        self.budget = batch_size * padded_width(int(np.diff(data.offsets).max(initial=1)))

    def batches(self, first: int, last: int) -> list[list[int]]:
        """The teacher batches over sequences [first, last) (:func:`pack_sequences`)."""
        lengths = np.diff(self.data.offsets[first:last + 1])
        return [list(range(first + a, first + b)) for a, b in pack_sequences(lengths, self.budget)]

    def _span(self, shard) -> tuple[int, int]:
        off = self.offsets
        first = int(np.searchsorted(off, shard.start, side="right")) - 1
        return first, int(np.searchsorted(off, shard.stop, side="left"))  # sequences [first, last) overlap it

    def logits(self, shard):
        off = self.offsets
        first, last = self._span(shard)
        for seqs in self.batches(first, last):
            width = padded_width(max(len(self.data.sequence(i)) for i in seqs))
            # the rows kept: each sequence's cached positions inside the shard (not padding)
            keep = np.concatenate([j * width + self.data.row_positions(i)[max(off[i], shard.start) - off[i]:
                                                                         min(off[i + 1], shard.stop) - off[i]]
                                   for j, i in enumerate(seqs)])
            rows = teacher_logits(self.model, [self.data.sequence(i) for i in seqs], self.pad_id, self.device, keep)
            yield int(max(off[seqs[0]], shard.start) - shard.start), rows  # (n, V)

    def ids(self, shard) -> np.ndarray:
        off = self.offsets
        first, last = self._span(shard)
        ids = np.repeat(np.arange(first, last), np.diff(off[first:last + 1]))
        return ids[shard.start - off[first]:shard.stop - off[first]]  # a token row's id is its sequence's
