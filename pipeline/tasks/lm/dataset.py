"""The cache in your own trainer: a ``torch.utils.data`` dataset over one split of a token
cache, its collator and the loss, for any loop that calls a causal LM on ``input_ids`` and
``attention_mask`` (Hugging Face ``Trainer``, TRL, your own).

The batches are read exactly as stage 3 reads them (:class:`pipeline.sequence_stream.SequenceStream`:
the teacher's rows on the padded grid, non-finite rows refused), and the loss is stage 3's
objective (:func:`pipeline.tasks.lm.sequence_objective`: the same representations, distances,
masking and vocabulary map)::

    data = CachedSequences(reader, tokens, split="train", loss=cfg.loss)  # tokens = task.load_data()

    class DistillTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            return data.loss(logits, inputs)
            # or, never holding the (B, L, V) logits: return data.model_loss(model, inputs)

    DistillTrainer(model=student, args=TrainingArguments(..., remove_unused_columns=False),
                   train_dataset=data, data_collator=data.collate).train()
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.losses import teacher_arrays
from pipeline.sequence_stream import SequenceStream
from pipeline.tasks.lm import fused_objective, prepare_batch, sequence_objective
from pipeline.tasks.lm.text import TokenData


class CachedSequences(torch.utils.data.Dataset):
    """The sequences of one split of a token cache. Items are sequence indices; the
    collator reads a whole batch at once from the cache, padded, with the teacher's rows.

    Args:
        reader: the open cache (rows are tokens; ``offsets`` map sequences to rows).
        tokens: the token data the cache was captured from (``TokenData``: the ids and where
            each sequence is).
        split: the cache's split to serve (``train``, ``heldout``).
        loss: a ``loss.*`` section: the distance, temperature, alpha, lam and k to train with.
        vocab_map: teacher id -> student id (-1: none) when the student's vocabulary differs
            but its ids are the teacher's; for a student with its own tokenizer, the
            :class:`pipeline.tasks.lm.alignment.CrossTokenizer` stage 3 builds (batches then
            come in the student's tokens, the teacher's rows at the aligned positions).
    """

    def __init__(self, reader: CacheReader, tokens: TokenData, *, split: str = "train", loss,
                 vocab_map: np.ndarray | None = None):
        arrays, self.lse_column = teacher_arrays(reader.manifest, loss)
        self.loss_cfg, self.vocab_map = loss, vocab_map
        self.rows = SequenceStream(reader, tokens.tokens, split=split, batch_size=1, seed=0, arrays=arrays,
                                   prefetch=1, token_offsets=tokens.offsets)

    def __len__(self) -> int:
        return len(self.rows.sequence_ids)

    def __getitem__(self, i: int) -> int:
        return int(self.rows.sequence_ids[i])

    def collate(self, sequences: list[int]) -> dict:
        """``input_ids`` and ``attention_mask`` (B, L), ``labels`` (B, L: the inputs where they
        are predicted, -100 elsewhere: padding, a chat's non-assistant tokens; Hugging Face
        causal LMs shift them), and ``kd``: the prepared batch the loss reads (teacher rows on
        the grid, the mask of positions with one)."""
        batch = prepare_batch(self.rows.read(np.asarray(sequences)), self.loss_cfg, self.lse_column, self.vocab_map)
        labels = torch.full_like(batch.input_ids, -100)
        labels[:, 1:] = batch.input_ids[:, 1:].masked_fill(~batch.label_mask(), -100)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels, "kd": batch}

    def loss(self, logits: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Stage 3's objective for the student's (B, L, V) logits over a collated batch."""
        return sequence_objective(logits, inputs["kd"], self.loss_cfg)

    def model_loss(self, model, inputs: dict, chunk_rows: int = 1024) -> torch.Tensor:
        """The same objective computed from ``model`` itself through the fused output head
        (:mod:`pipeline.fused_head`): its logits are never all held, so longer sequences and
        larger batches fit. Call it in place of ``model(...)`` + :meth:`loss`."""
        device = next(model.parameters()).device
        return fused_objective(model, inputs["kd"], self.loss_cfg, device, chunk_rows)
