"""What an LM student trains on: its variants of one cache, the teacher's rows mapped
onto its ids, and ``alpha * CE + lam * D`` over a batch of sequences (the fused head's
form too)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import CacheReader
from pipeline.cache.format import SAMPLED_CNT, SAMPLED_IDX, TOPK_IDX, TOPK_VAL, row_bytes
from pipeline.config import Distance
from pipeline.distances import DISTANCES
from pipeline.errors import ConfigError
from pipeline.fused_head import head_loss
from pipeline.losses import select_teacher, teacher_term
from pipeline.representations import map_ids, pad_entries
from pipeline.sequence_stream import SequenceBatch

log = logging.getLogger(__name__)

@dataclass
class Variant:
    """One student run of a cache: ``labels``, ``topk_kl[:K]`` or ``sampled_kl``."""

    name: str
    k: int = 0  # topk_kl: the first k cached logits (0: all)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, k = text.partition(":")
        return cls(name, int(k) if k else 0)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.k}" if self.k else self.name

    def loss(self, base):
        """The ``loss.*`` section this variant trains with."""
        if self.name == "labels":
            return dataclasses.replace(base, alpha=1.0, lam=0.0)
        return dataclasses.replace(base, distance=Distance(self.name), k=self.k)


def bytes_per_token(v: Variant, reader: CacheReader) -> int:
    """What a cache holding only this variant's rows would store per token (ids aside)."""
    m = reader.manifest
    if v.name == "labels":
        return 0
    reads = DISTANCES[v.name].reads
    return row_bytes(dataclasses.replace(m, k=v.k or m.k) if reads == "topk" else m, (reads,))


def vocab_map(spec, reader: CacheReader, student_vocab: int) -> np.ndarray | None:
    """None when the student's vocabulary is the teacher's; else teacher id -> student id (-1: none)."""
    width = reader.manifest.num_classes
    tok = reader.manifest.task.get("vocab", {}).get("tokenizer_size", width)
    if student_vocab == width and not spec.vocab_map:
        return None
    if not spec.vocab_map:
        raise ConfigError(f"the student's vocabulary has {student_vocab} ids but the teacher's logits are {width} wide "
                         f"(its tokenizer has {tok} tokens): a student with its own tokenizer takes "
                         "student.<name>.tokenizer=<its tokenizer folder> (aligned by byte spans); one that shares the "
                         f"teacher's ids takes vocab_map=truncate (student ids are the teacher's first {student_vocab}, "
                         f"e.g. a padded teacher vocabulary) or vocab_map=<file.npy> mapping each of the {width} "
                         "teacher ids to a student id (-1: none)")
    if spec.vocab_map == "truncate":
        m = np.arange(width, dtype=np.int64)
        m[m >= student_vocab] = -1
        return m
    m = np.load(spec.vocab_map).astype(np.int64)
    if m.shape != (width,) or m.max() >= student_vocab or m.min() < -1:
        raise ConfigError(f"vocab_map {spec.vocab_map!r}: expected {width} ids in -1..{student_vocab - 1}, "
                         f"got shape {m.shape}, range {m.min()}..{m.max()}")
    kept = m[m >= 0]
    if len(np.unique(kept)) != len(kept):
        raise ConfigError(f"vocab_map {spec.vocab_map!r} maps several teacher ids to one student id; the sparse "
                         "losses need a one-to-one map (-1 for teacher ids the student lacks)")
    return m


def to_student(batch: SequenceBatch, adapter) -> SequenceBatch:
    """A cached batch as the student reads it: unchanged (the teacher's tokenizer), through a
    vocabulary map (an array: :func:`map_batch`), or re-tokenized and aligned (a callable:
    :class:`pipeline.tasks.lm.alignment.CrossTokenizer`)."""
    if adapter is None or isinstance(adapter, np.ndarray):
        return map_batch(batch, adapter)
    return adapter(batch)


def map_batch(batch: SequenceBatch, vmap: np.ndarray | None) -> SequenceBatch:
    """Inputs and teacher rows in the student's ids. A cached top-K entry with no student id
    gets probability 0 (its mass joins the tail): padding, id -1 and value -inf, as in an
    adaptive row; a sampled draw with none is dropped."""
    if vmap is None:
        return batch
    ids = vmap[batch.input_ids.numpy()]
    if (ids[batch.attention_mask.numpy() == 1] < 0).any():
        raise ConfigError("the batch holds input tokens the vocab_map leaves unmapped; the student cannot read them")
    t = dict(batch.teacher)
    distil = batch.teacher_mask()
    if TOPK_IDX in t:
        idx = map_ids(t[TOPK_IDX], vmap)
        t[TOPK_IDX], t[TOPK_VAL] = pad_entries(idx, t[TOPK_VAL], idx < 0)
        distil = distil & (idx >= 0).any(1)  # all of it in the tail: nothing to distil
    if SAMPLED_IDX in t:
        sid = t[SAMPLED_IDX]
        mapped = map_ids(sid, vmap)
        t[SAMPLED_CNT] = np.where(mapped >= 0, t[SAMPLED_CNT], 0).astype(t[SAMPLED_CNT].dtype)
        t[SAMPLED_IDX] = mapped.astype(np.int32)
        distil = distil & (t[SAMPLED_CNT].sum(axis=1) > 0)  # no draw left: nothing to distil there
    # a row left nothing to distil is still trained on its label
    return dataclasses.replace(batch, input_ids=torch.from_numpy(np.maximum(ids, 0)), teacher=t, distil_mask=distil)


def student_logits(student, batch: SequenceBatch, device) -> torch.Tensor:
    """(B, L, V) logits of the student over a padded batch."""
    return student(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   use_cache=False).logits


def next_token_nll(logits: torch.Tensor, batch: SequenceBatch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each scored position (:meth:`SequenceBatch.label_mask`) against the next token."""
    labels = batch.input_ids[:, 1:].masked_fill(~batch.label_mask(), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)


def prepare_batch(batch: SequenceBatch, loss, lse_column: int, adapter) -> SequenceBatch:
    """A batch as the loss reads it: the teacher's arrays selected (the lse column of the
    loss's temperature, the first ``loss.k`` of the top-K) and in the student's tokens
    (:func:`to_student`)."""
    if loss.lam > 0:
        batch = dataclasses.replace(batch, teacher=select_teacher(batch.teacher, lse_column, loss.k))
    return to_student(batch, adapter)


def sequence_objective(logits: torch.Tensor, batch: SequenceBatch, loss) -> torch.Tensor:
    """``alpha * CE(next token) + lam * D(teacher, student)`` over the real tokens of a
    prepared batch, from the student's (B, L, V) logits (float32 for the loss: a no-op unless
    they come from bf16 autocast)."""
    logits = logits.float()
    ce = next_token_nll(logits, batch)
    if loss.lam <= 0:
        return loss.alpha * ce
    flat = logits.reshape(-1, logits.shape[-1])  # (B * L, V): the kernels' rows, padding masked out
    device = logits.device
    t = batch.teacher if device.type == "cpu" else {k: torch.as_tensor(v).to(device) for k, v in batch.teacher.items()}
    return loss.alpha * ce + teacher_term(flat, t, loss, mask=batch.teacher_mask())


def sequence_loss(student, batch: SequenceBatch, loss, lse_column: int, adapter, device,
                  fused: bool = False, chunk_rows: int = 1024) -> torch.Tensor:
    """The objective of one batch for ``student`` (what stage 3 trains with); ``fused``:
    through the fused output head (:func:`fused_objective`), the same value and gradients."""
    batch = prepare_batch(batch, loss, lse_column, adapter)
    if fused:
        return fused_objective(student, batch, loss, device, chunk_rows)
    return sequence_objective(student_logits(student, batch, device), batch, loss)


def output_head(student) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """A causal LM's body (to its last, normalised hidden state) and its output projection,
    or an error saying why its logits are not that projection alone."""
    head = student.get_output_embeddings()
    body = getattr(student, getattr(student, "base_model_prefix", ""), None)
    extra = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
             if getattr(student.config, k, None) not in (None, 1, 1.0)]
    if not isinstance(head, torch.nn.Linear) or body is None or body is student or extra:
        raise ConfigError(f"lm.fused_head: {type(student).__name__}'s logits are not a linear projection of its "
                         f"base model's last hidden state{f' ({extra} set)' if extra else ''}: set "
                         "lm.fused_head=false")
    return body, head


def fused_objective(student, batch: SequenceBatch, loss, device, chunk_rows: int = 1024) -> torch.Tensor:
    """:func:`sequence_objective` without the (B, L, V) logits: the student's last hidden
    states and output head go to :func:`pipeline.fused_head.head_loss` chunk by chunk."""
    body, head = output_head(student)
    hidden = body(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                  use_cache=False).last_hidden_state
    b, length, _ = hidden.shape
    labels = torch.full((b, length), -1, dtype=torch.long)
    labels[:, :-1] = batch.input_ids[:, 1:].masked_fill(~batch.label_mask(), -1)
    teacher = batch.teacher if loss.lam > 0 else None
    return head_loss(hidden.reshape(b * length, -1), head.weight, head.bias, labels.reshape(-1), teacher, loss,
                     teacher_mask=batch.teacher_mask(), chunk_rows=chunk_rows)
