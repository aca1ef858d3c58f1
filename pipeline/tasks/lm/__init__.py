"""The language-model task: a causal LM teacher over token sequences, one cache row per
real token (padding is never cached, ``offsets`` map sequences to rows), causal LM
students trained from the cache without the teacher.

Capture: shards are fixed ranges of token rows, so a sequence can straddle two shards;
each shard runs the teacher over every sequence it overlaps and keeps its own rows (at
most one sequence per shard boundary is computed twice).

Students: each variant (``lm.variants``) trains the same student from the same
initialisation for the same steps on the same sequence order: ``labels`` on next-token
labels alone, ``topk_kl:K`` on the first K cached logits + a tail bucket, ``sampled_kl``
from the cached draws, each ``alpha * CE + lam * D`` under the padding mask. Evaluation
on the held-out sequences: perplexity, and KL(teacher || student) over the cached
top-K + tail at T=1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import CacheReader, Storage, cache_key, fingerprint_fields, make_fingerprint
from pipeline.cache import open_cache as open_cache_at
from pipeline.cache.fingerprint import capture_settings, layout_settings
from pipeline.cache.format import LSE, SAMPLED_CNT, SAMPLED_IDX, TOPK_IDX, TOPK_VAL, row_bytes
from pipeline.capture import plan_manifest
from pipeline.config import DataSource, Distance, StudentArch, resolve_workers
from pipeline.device import choose_device
from pipeline.fused_head import FUSED_DISTANCES, head_loss
from pipeline.losses import select_teacher, teacher_arrays, teacher_term, torch_topk_kl
from pipeline.representations import map_ids, pad_entries
from pipeline.stream import SequenceBatch, SequenceStream, pad_batch
from pipeline.tasks.base import Task
from pipeline.tasks.lm.alignment import (
    CrossTokenizer,
    StudentTokens,
    TokenBytes,
    projection,
    retokenize,
    student_tokenizer,
)
from pipeline.tasks.lm.models import (
    LMTeacher,
    build_student,
    load_teacher,
    load_tokenizer,
    pad_id,
    student_weights,
    teacher_identity,
    tokenizer_hash,
)
from pipeline.tasks.lm.text import TokenData, load_tokens
from pipeline.training import process_group

log = logging.getLogger(__name__)

LM_TEACHERS = ("smollm2", "hf_causal_lm")
LM_DISTANCES = ("topk_kl", "sampled_kl", "uld_topk", "uld_sampled")  # what a token cache's rows give
TEACHER_EVAL = "teacher_eval.json"  # the teacher's held-out perplexity, beside the cache


# --- capture -------------------------------------------------------------------------------


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


def scored_positions(data: TokenData, i: int) -> np.ndarray:
    """The positions of sequence i whose next-token prediction is scored: those with a cache
    row and a next token."""
    p = data.row_positions(i)
    return p[p + 1 < data.offsets[i + 1] - data.offsets[i]]


@torch.inference_mode()
def teacher_heldout_nll(model, data: TokenData, batch_size: int, device: torch.device, pad_id: int) -> dict:
    """The teacher's next-token loss on the held-out sequences' scored positions (its perplexity)."""
    a, z = data.sequences["heldout"]
    total, count = 0.0, 0
    for b in range(a, z, batch_size):
        seqs = [data.sequence(i) for i in range(b, min(b + batch_size, z))]
        logp = torch.log_softmax(teacher_logits(model, seqs, pad_id, device).float(), dim=-1)
        for j, s in enumerate(seqs):
            p = scored_positions(data, b + j)
            target = torch.from_numpy(s[p + 1]).to(device)
            total -= logp[j, torch.from_numpy(p).to(device)].gather(1, target[:, None]).sum().item()
            count += len(p)
    return {"heldout_tokens": count, "heldout_nll": total / count, "heldout_perplexity": float(np.exp(total / count))}


def read_teacher_eval(storage: Storage) -> dict:
    """The teacher's held-out evaluation stored beside the cache ({} before stage 1 wrote it)."""
    return json.loads(storage.read_bytes(TEACHER_EVAL)) if storage.exists(TEACHER_EVAL) else {}


# --- students ------------------------------------------------------------------------------


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
    if v.name in ("topk_kl", "uld_topk"):
        return row_bytes(dataclasses.replace(m, k=v.k or m.k), ("topk",))
    return row_bytes(m, ("sampled",)) if v.name in ("sampled_kl", "uld_sampled") else 0


def vocab_map(spec, reader: CacheReader, student_vocab: int) -> np.ndarray | None:
    """None when the student's vocabulary is the teacher's; else teacher id -> student id (-1: none)."""
    width = reader.manifest.num_classes
    tok = reader.manifest.vocab.get("tokenizer_size", width)
    if student_vocab == width and not spec.vocab_map:
        return None
    if not spec.vocab_map:
        raise ValueError(f"the student's vocabulary has {student_vocab} ids but the teacher's logits are {width} wide "
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
        raise ValueError(f"vocab_map {spec.vocab_map!r}: expected {width} ids in -1..{student_vocab - 1}, "
                         f"got shape {m.shape}, range {m.min()}..{m.max()}")
    kept = m[m >= 0]
    if len(np.unique(kept)) != len(kept):
        raise ValueError(f"vocab_map {spec.vocab_map!r} maps several teacher ids to one student id; the sparse "
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
        raise ValueError("the batch holds input tokens the vocab_map leaves unmapped; the student cannot read them")
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
        raise ValueError(f"train.fused_head: {type(student).__name__}'s logits are not a linear projection of its "
                         f"base model's last hidden state{f' ({extra} set)' if extra else ''}: set "
                         "train.fused_head=false")
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


@torch.no_grad()
def evaluate(student, reader: CacheReader, data: TokenData, batch_size: int, adapter, device) -> dict:
    """Held-out perplexity (of the student's tokens), and KL(teacher || student) over the
    cached top-K + tail at T=1 at the positions with a teacher row (with another tokenizer:
    the aligned ones, the rows projected onto the student's ids)."""
    student.eval()
    m = reader.manifest
    arrays = (TOPK_IDX, TOPK_VAL, LSE) if "topk" in m.modes and 1.0 in m.temperatures else ()
    col = m.temperatures.index(1.0) if arrays else 0
    stream = SequenceStream(reader, data.tokens, split="heldout", batch_size=batch_size, seed=0, arrays=arrays,
                            token_offsets=data.offsets)
    nll, count, kl, kl_rows = 0.0, 0, 0.0, 0
    for batch in stream:
        batch = to_student(dataclasses.replace(batch, teacher=select_teacher(batch.teacher, col)) if arrays
                           else batch, adapter)
        logits = student_logits(student, batch, device)
        tokens = int(batch.label_mask().sum())
        nll += next_token_nll(logits, batch, reduction="sum").item()
        count += tokens
        if arrays:
            rows = batch.teacher_mask()
            flat = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(rows).to(device)].float()
            idx, val, lse = (torch.from_numpy(batch.teacher[n][rows]).to(device) for n in arrays)
            kl += torch_topk_kl(flat, idx, val, lse, 1.0).sum().item()
            kl_rows += len(flat)
    student.train()
    return {"heldout_perplexity": math.exp(nll / count), "heldout_nll": nll / count, "heldout_tokens": count,
            "heldout_kl_topk": kl / kl_rows if kl_rows else None}


def heldout_bytes(data: TokenData, tokenizer) -> int:
    """UTF-8 bytes of the held-out tokens that are predicted (the next tokens of the scored
    positions; each run of consecutive ones decoded together, so a character split over
    tokens counts once): bits per byte = total NLL / ln 2 / this, comparable across tokenizers."""
    a, z = data.sequences["heldout"]
    total = 0
    for i in range(a, z):
        targets = scored_positions(data, i) + 1
        s = data.sequence(i)
        for run in np.split(targets, np.flatnonzero(np.diff(targets) != 1) + 1):
            if len(run):
                total += len(tokenizer.decode(s[run].tolist(), clean_up_tokenization_spaces=False).encode())
    return total


def bits_per_byte(nll: float, tokens: int, n_bytes: int) -> float:
    """Mean NLL (nats) over ``tokens`` predictions, as bits per byte of their text."""
    return nll * tokens / math.log(2) / n_bytes


class LanguageModel(Task):
    name = "lm"

    @staticmethod
    def validate(cfg, p: list[str]) -> None:
        if cfg.teacher.name not in LM_TEACHERS:
            p.append(f"teacher.name={cfg.teacher.name!r}: task=lm teachers are {list(LM_TEACHERS)}")
        if cfg.teacher.name == "hf_causal_lm" and not cfg.teacher.path:
            p.append("teacher=hf_causal_lm needs teacher.path: a folder with a Hugging Face causal LM "
                     "(config.json + weights, or a .gguf named by teacher.gguf_file)")
        if cfg.data.source not in (DataSource.shakespeare, DataSource.corpus):
            p.append(f"data.source={cfg.data.source.value}: task=lm reads text: data=shakespeare (built in) or "
                     "data=corpus data.path=<your corpus>")
        bad = [k for k, s in cfg.student.items() if s.arch is not StudentArch.causal_lm]
        if bad:
            p.append(f"students {bad} are not causal LMs: task=lm trains student=causal_lm")
        for k, s in cfg.student.items():
            if s.init.value == "teacher_layers" and (s.path or not s.layers):
                p.append(f"student.{k}: init=teacher_layers takes the teacher's layers, listed in "
                         f"student.{k}.layers=[...] (got {list(s.layers)}), and no path (got {s.path!r})")
        if cfg.loss.distance.value not in LM_DISTANCES:
            p.append(f"loss.distance={cfg.loss.distance.value}: task=lm trains with {', '.join(LM_DISTANCES)}")
        for k, s in cfg.student.items():
            if s.projection not in ("prefix", "exact"):
                p.append(f"student.{k}.projection={s.projection!r}: expected prefix or exact")
            if s.tokenizer and s.tokenizer.startswith("bpe:") and not s.tokenizer[4:].isdigit():
                p.append(f"student.{k}.tokenizer={s.tokenizer!r}: bpe:<vocabulary size>, e.g. bpe:8000")
        if not 0 <= cfg.loss.k <= cfg.cache.k:
            p.append(f"loss.k={cfg.loss.k}: must be in 0..cache.k={cfg.cache.k} (0 uses all cached logits)")
        if cfg.teacher.batch_size <= 0:
            p.append(f"teacher.batch_size={cfg.teacher.batch_size}: must be > 0 (sequences per forward)")
        if cfg.data.seq_len < 2:
            p.append(f"data.seq_len={cfg.data.seq_len}: must be >= 2 (a sequence predicts its next tokens)")
        if cfg.data.train_size < 0:
            p.append(f"data.train_size={cfg.data.train_size}: must be >= 0 (0: every sequence not held out)")
        if cfg.data.test_size <= 0:
            p.append(f"data.test_size={cfg.data.test_size}: must be > 0 (held-out sequences)")
        if cfg.lm.eval_batch_size <= 0:
            p.append(f"lm.eval_batch_size={cfg.lm.eval_batch_size}: must be > 0")
        for v in cfg.lm.variants:
            name, _, k = v.partition(":")
            if name not in ("labels", *LM_DISTANCES) or (k and (not k.isdigit() or name not in ("topk_kl", "uld_topk"))):
                p.append(f"lm.variants: {v!r} is not one of labels, topk_kl[:<K>], sampled_kl, uld_topk[:<K>], "
                         "uld_sampled")
            elif k and not 0 < int(k) <= cfg.cache.k:
                p.append(f"lm.variants: {v!r} asks for more than the cache's K={cfg.cache.k}")

    # -- data, teacher, cache -----------------------------------------------------------------
    def load_data(self) -> TokenData:
        """The token data, with the teacher's tokenizer (the model itself is not loaded)."""
        return load_tokens(self.cfg.data, self.root, self.tokenizer)

    @functools.cached_property
    def tokenizer(self):
        """The teacher's tokenizer, loaded once (the model is not)."""
        return load_tokenizer(self.cfg.teacher)

    def capture_settings(self) -> dict:
        return capture_settings(self.cfg.cache, self.cfg.teacher.precision)

    def cache_key(self, data: TokenData) -> str:
        t = dataclasses.asdict(self.cfg.teacher)
        ident = {"teacher": {k: t[k] for k in ("name", "path", "gguf_file", "precision")},
                 "data": data.content_hash(), "capture": self.capture_settings(),
                 "layout": layout_settings(self.cfg.cache)}
        return cache_key(self.cfg.data.name, self.cfg.teacher.name, ident)

    def expected_fields(self, data: TokenData) -> dict:
        """From the tokenizer and the weight files' hash: the model is never loaded."""
        return fingerprint_fields(dataset=data.content_hash(), teacher=teacher_identity(self.cfg.teacher, self.tokenizer),
                                  capture=self.capture_settings())

    def open_cache(self, data: TokenData, num_classes: int | None = None) -> CacheReader:
        return self.checked_reader(super().open_cache(data), data)

    def checked_reader(self, reader: CacheReader, data: TokenData) -> CacheReader:
        """``reader`` once its sequence index and tokenizer are the token data's."""
        index = data.index
        if not np.array_equal(reader.offsets, index.offsets) or (reader.positions is None) != (
                index.positions is None) or (index.positions is not None and not np.array_equal(
                    reader.positions, index.positions)):
            raise ValueError(f"cache {reader.path!r}: its sequence index (offsets, positions) differs from the "
                             "token data's; re-run stage 1")
        if reader.manifest.tokenizer_sha256 not in ("", data.tokenizer_hash):
            raise ValueError(f"cache {reader.path!r} was captured with another tokenizer than the teacher's "
                             f"(tokenizer.json sha256 {reader.manifest.tokenizer_sha256[:12]}, the teacher's "
                             f"{data.tokenizer_hash[:12]}): re-run stage 1 with this teacher")
        return reader

    def index(self, data: TokenData):
        """The cache's sequence index: where the rows are, and the teacher's tokenizer (each
        token's bytes: what aligns a student with another tokenizer). A tokenizer without a
        ``tokenizers`` backend (a slow one) is not recorded."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str().encode() if backend is not None else None
        return dataclasses.replace(data.index, tokenizer=text)

    def load_teacher(self, data: TokenData) -> LMTeacher:
        return load_teacher(self.cfg.teacher)

    def plan(self, teacher: LMTeacher, data: TokenData):
        width = teacher.model.get_output_embeddings().weight.shape[0]
        fields = fingerprint_fields(dataset=data.content_hash(), teacher=teacher.identity,
                                    capture=self.capture_settings())
        index = self.index(data)
        m = plan_manifest(self.cfg.cache, rows=int(index.offsets[-1]), num_classes=width,
                          splits={name: data.rows(name) for name in data.sequences},
                          fingerprint=make_fingerprint(fields), index=index,
                          vocab={"logit_width": width, "tokenizer_size": len(teacher.tokenizer)})
        log.info("capture plan: %d token rows (of %d tokens) in %d sequences, logit width %d", m.rows,
                 len(data.tokens), m.sequences, width)
        return m, index

    def rows(self, teacher: LMTeacher, data: TokenData, device) -> TokenRows:
        return TokenRows(teacher.model.to(device), data, self.cfg.teacher.batch_size, teacher.pad_id, device)

    @torch.inference_mode()
    def after_capture(self, teacher: LMTeacher, data: TokenData, cache_url: str) -> None:
        """The teacher's held-out perplexity, stored beside the cache (``teacher_eval.json``)
        so stage 3 compares students with it without loading the teacher. Computed once, by rank 0."""
        storage = Storage(cache_url, self.cfg.cache.storage_options)
        if resolve_workers(self.cfg)[0] != 0 or read_teacher_eval(storage):
            return
        device = choose_device(self.cfg.teacher.device)
        ev = teacher_heldout_nll(teacher.model.to(device), data, self.cfg.teacher.batch_size, device, teacher.pad_id)
        ev["heldout_bytes"] = heldout_bytes(data, teacher.tokenizer)
        storage.write_atomic(json.dumps(ev, indent=2).encode(), TEACHER_EVAL)
        log.info("teacher held-out perplexity %.2f over %d tokens", ev["heldout_perplexity"], ev["heldout_tokens"])

    def row_labels(self, data: TokenData, reader: CacheReader) -> np.ndarray:
        """A token row's label is the next token of its sequence (none after the last)."""
        index = data.index
        seq = np.repeat(np.arange(len(index.offsets) - 1), np.diff(index.offsets))
        pos = np.arange(len(seq)) - index.offsets[seq] if index.positions is None else index.positions
        at = data.offsets[seq] + pos + 1  # the next token's index in data.tokens
        has_next = at < data.offsets[seq + 1]
        return np.where(has_next, data.tokens[np.minimum(at, len(data.tokens) - 1)], -1).astype(np.int64)

    # -- students -------------------------------------------------------------------------------
    def variants(self) -> list[Variant]:
        if self.cfg.lm.variants:
            return [Variant.parse(v) for v in self.cfg.lm.variants]
        return [Variant("labels"), Variant(self.cfg.loss.distance.value, self.cfg.loss.k)]

    def train_students(self, data: TokenData, reader: CacheReader, run_dir: str) -> list[dict]:
        device = choose_device(self.cfg.train.device)
        return [self.train_variant(name, spec, v, data, reader, device, os.path.join(run_dir, "students"))
                for name, spec in self.cfg.student.items() for v in self.variants()]

    def train_variant(self, name: str, spec, v: Variant, data: TokenData, reader: CacheReader,
                      device: torch.device, save_dir: str | None = None) -> dict:
        cfg = self.cfg
        loss = v.loss(cfg.loss)
        cross = self.student_tokens(spec, reader, data)
        seq_len = cfg.data.seq_len if cross is None else max(cfg.data.seq_len, int(np.diff(cross.tokens.offsets).max()))
        width = len(cross.tokenizer) if cross is not None else reader.manifest.num_classes
        student = build_student(spec, int(spec.kwargs.get("vocab_size", width)), seq_len, cfg.train.seed,
                                cfg.teacher).to(device)
        vocab = student.get_output_embeddings().weight.shape[0]
        if cross is None:
            adapter = eval_adapter = vocab_map(spec, reader, vocab)
        else:
            if vocab < width:
                raise ValueError(f"student {name}: its vocabulary has {vocab} ids, its tokenizer "
                                 f"{spec.tokenizer!r} {width}: drop kwargs.vocab_size or make it >= {width}")
            proj = projection(cross.teacher, cross.student, spec.projection)
            projects = loss.distance.value in ("topk_kl", "sampled_kl")
            adapter = CrossTokenizer(cross.tokens, pad_id(cross.tokenizer), proj if projects else None,
                                     loss.temperature)
            eval_adapter = adapter.projecting(proj, 1.0)
        arrays, lse_column = teacher_arrays(reader.manifest, loss)
        rank, world = process_group(device)
        # the fused head (no (B, L, V) logits): one process (DistributedDataParallel averages
        # gradients through the model's own forward), a distance it has a fused form of
        fused = cfg.train.fused_head and world == 1 and (loss.lam <= 0 or loss.distance.value in FUSED_DISTANCES)
        if cfg.train.fused_head and not fused:
            log.info("%s %s: the unfused head (%s)", name, v.label,
                     "several processes" if world > 1 else f"{loss.distance.value} has no fused form")
        stream = SequenceStream(reader, data.tokens, split="train", batch_size=cfg.train.batch_size,
                                seed=cfg.train.seed, arrays=arrays, rank=rank, world_size=world,
                                token_offsets=data.offsets)
        steps = self.steps(stream)
        identity = self.student_identity(spec, loss) | {"weights": student_weights(spec, cfg.teacher)}
        state = self.state_path(reader, f"{name}-{v.label.replace(':', '-')}", identity)
        done, final, seconds = self.fit(
            student, stream, steps, lambda model, batch: sequence_loss(model, batch, loss, lse_column, adapter, device,
                                                                       fused, cfg.train.fused_head_rows),
            desc=f"{name}: {v.label}", state_path=state)
        row = {"student": name, "variant": v.label, "bytes_per_token": bytes_per_token(v, reader), "steps": done,
               "params": sum(p.numel() for p in student.parameters()), "train_s": seconds, "processes": world,
               "tokens_per_s": done * cfg.train.batch_size * world * cfg.data.seq_len / seconds, "final_loss": final}
        if cross is not None:
            row |= {"tokenizer": spec.tokenizer, "vocabulary": width, "projection": spec.projection,
                    "aligned_fraction": cross.tokens.aligned_fraction(*data.sequences["train"])}
        if rank != 0:
            return row  # rank 0 evaluates and saves the student
        row |= evaluate(student, self.eval_reader(data) or reader, data, cfg.lm.eval_batch_size, eval_adapter, device)
        n_bytes = self.heldout_bytes(data) if cross is None else cross.tokens.predicted_bytes(*data.sequences["heldout"])
        row["heldout_bits_per_byte"] = bits_per_byte(row["heldout_nll"], row["heldout_tokens"], n_bytes)
        if save_dir:  # a standard HF folder (config.json + model.safetensors)
            row["checkpoint"] = os.path.join(save_dir, name, v.label.replace(":", "-"))
            student.save_pretrained(row["checkpoint"])
            if cross is not None:
                cross.tokenizer.save_pretrained(row["checkpoint"])  # the student reads its own tokens
        log.info("%s %s: held-out perplexity %.2f, %.4f bits/byte, KL %.4f", name, v.label, row["heldout_perplexity"],
                 row["heldout_bits_per_byte"], row["heldout_kl_topk"] or float("nan"))
        return row

    def eval_reader(self, data: TokenData) -> CacheReader | None:
        """``lm.eval_cache`` opened and checked against the run's data and teacher as the
        training cache is (any representation: it is a yardstick; None: not set)."""
        if not self.cfg.lm.eval_cache:
            return None
        if getattr(self, "_eval_reader", None) is None:
            expected = {k: v for k, v in self.expected_fields(data).items() if k != "capture"}
            self._eval_reader = self.checked_reader(
                open_cache_at(self.cfg.lm.eval_cache, expected=expected,
                           storage_options=self.cfg.cache.storage_options), data)
        return self._eval_reader

    def student_tokens(self, spec, reader: CacheReader, data: TokenData) -> CrossData | None:
        """None when the student reads the teacher's tokens (no ``student.tokenizer``, or one
        identical to the teacher's); else its tokenizer and the corpus re-tokenized and
        aligned by byte spans (computed once per tokenizer)."""
        if not spec.tokenizer:
            return None
        if spec.vocab_map:
            raise ValueError(f"student.tokenizer={spec.tokenizer!r} and student.vocab_map={spec.vocab_map!r}: set "
                             "one (a tokenizer is aligned by byte spans; a vocab_map renames the teacher's ids)")
        done = self.__dict__.setdefault("_student_tokens", {})
        if spec.tokenizer not in done:
            text = reader.tokenizer_json
            if text is None:
                raise ValueError(f"cache {reader.path!r} records no teacher tokenizer, so its tokens' byte spans are "
                                 f"unknown and student.tokenizer={spec.tokenizer!r} cannot be aligned with them: "
                                 "capture it again with stage 1 of this version and a fast (tokenizer.json) "
                                 "teacher tokenizer, which every token cache then records")
            tok = student_tokenizer(spec.tokenizer, data, text, self.root)
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(f"student.tokenizer={spec.tokenizer!r} is a slow tokenizer; byte alignment reads a "
                                 "fast one's tokenizer.json")
            if tokenizer_hash(tok) == reader.manifest.tokenizer_sha256:  # before reading either one's bytes
                log.info("student.tokenizer=%s is the teacher's: no alignment needed", spec.tokenizer)
                done[spec.tokenizer] = None
            else:
                teacher = TokenBytes(text, "teacher's tokenizer")
                student = TokenBytes(backend.to_str(), f"student.tokenizer={spec.tokenizer}")
                tokens = retokenize(data, teacher, tok, student)
                cross = CrossData(tok, tokens, teacher, student)
                log.info("student.tokenizer=%s: %d ids; the corpus is %d of its tokens (%d of the teacher's); "
                         "%.1f%% of its training positions are aligned with a teacher row", spec.tokenizer, len(tok),
                         len(tokens.tokens), len(data.tokens), 100 * tokens.aligned_fraction(*data.sequences["train"]))
                done[spec.tokenizer] = cross
        return done[spec.tokenizer]

    def heldout_bytes(self, data: TokenData) -> int:
        if getattr(self, "_heldout_bytes", None) is None:
            self._heldout_bytes = heldout_bytes(data, self.tokenizer)
        return self._heldout_bytes

    def results(self, rows: list[dict], reader: CacheReader) -> tuple[dict, str]:
        teacher = read_teacher_eval(reader.storage)
        if teacher and "heldout_bytes" in teacher:
            teacher["heldout_bits_per_byte"] = bits_per_byte(teacher["heldout_nll"], teacher["heldout_tokens"],
                                                             teacher["heldout_bytes"])
        full = reader.manifest.num_classes * 2
        return ({"teacher": teacher, "full_fp16_bytes_per_token": full},
                format_lm_results(rows, teacher, full))


@dataclass
class CrossData:
    """A student tokenizer other than the teacher's, and the corpus in its tokens."""

    tokenizer: object
    tokens: StudentTokens
    teacher: TokenBytes
    student: TokenBytes


def format_lm_results(rows: list[dict], teacher: dict, full_bytes: int) -> str:
    lines = ["| student | trained on | bytes/token | held-out perplexity | bits/byte | held-out KL (top-K+tail) "
             "| steps | time |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    # a student with its own tokenizer: its perplexity is over its tokens (compare bits/byte)
    if teacher:
        bpb = f"{teacher['heldout_bits_per_byte']:.4f}" if "heldout_bits_per_byte" in teacher else "-"
        lines.append(f"| teacher | - | {full_bytes:,} (full fp16) | {teacher['heldout_perplexity']:.2f} | {bpb} | 0 "
                     "| - | - |")
    for r in rows:
        kl = f"{r['heldout_kl_topk']:.4f}" if r["heldout_kl_topk"] is not None else "-"
        bpb = f"{r['heldout_bits_per_byte']:.4f}" if r.get("heldout_bits_per_byte") else "-"
        tok = f" ({r['tokenizer']}, {100 * r['aligned_fraction']:.0f}% aligned)" if r.get("tokenizer") else ""
        lines.append(f"| {r['student']}{tok} | {r['variant']} | {r['bytes_per_token']} | {r['heldout_perplexity']:.2f} | "
                     f"{bpb} | {kl} | {r['steps']} | {r['train_s']:.0f}s |")
    return "\n".join(lines)
