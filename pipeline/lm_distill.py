"""Stage 3 for task=lm: causal LM students trained from a token cache, without the teacher.

Each variant (``lm.variants``) trains the same student from the same initialisation for
``train.steps`` optimizer steps on the same sequence order: ``labels`` on next-token labels
alone, the others on ``alpha * CE + lam * D`` with D the sparse KL of the kernels issue
(``topk_kl`` over the first K cached logits + a tail bucket, ``sampled_kl`` from the cached
draws) under the padding mask. Evaluation on the held-out sequences: perplexity, and the
teacher-to-student KL over the cached top-K + tail at T=1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.cache import CacheReader
from pipeline.cache.format import (
    LSE,
    SAMPLED_CNT,
    SAMPLED_ENT,
    SAMPLED_IDX,
    TOPK_IDX,
    TOPK_VAL,
    row_bytes,
)
from pipeline.causal_lm import build_student
from pipeline.config import Config
from pipeline.losses import sampled_kl_loss, topk_kl_loss, torch_topk_kl
from pipeline.sequence_stream import SequenceBatch, SequenceStream
from pipeline.text import TokenData
from pipeline.token_capture import read_teacher_eval
from pipeline.training import make_optimizer

log = logging.getLogger(__name__)

TOPK_ARRAYS = (TOPK_IDX, TOPK_VAL, LSE)
SAMPLED_ARRAYS = (SAMPLED_IDX, SAMPLED_CNT, SAMPLED_ENT)


@dataclass
class Variant:
    name: str  # labels | topk_kl | sampled_kl
    k: int = 0  # topk_kl: the first k cached logits (0: all)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, k = text.partition(":")
        return cls(name, int(k) if k else 0)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.k}" if self.k else self.name

    @property
    def arrays(self) -> tuple[str, ...]:
        return {"labels": (), "topk_kl": TOPK_ARRAYS, "sampled_kl": SAMPLED_ARRAYS}[self.name]


def variants(cfg: Config) -> list[Variant]:
    if cfg.lm.variants:
        return [Variant.parse(v) for v in cfg.lm.variants]
    return [Variant("labels"), Variant(cfg.loss.distance.value, cfg.loss.k)]


def bytes_per_token(v: Variant, reader: CacheReader) -> int:
    """What a cache holding only this variant's rows would store per token (ids aside)."""
    m = reader.manifest
    if v.name == "topk_kl":
        return row_bytes(dataclasses.replace(m, k=v.k or m.k), ("topk",))
    return row_bytes(m, ("sampled",)) if v.name == "sampled_kl" else 0


# --- vocabularies --------------------------------------------------------------------------


def vocab_map(spec, reader: CacheReader, student_vocab: int) -> np.ndarray | None:
    """None when the student's vocabulary is the teacher's; else teacher id -> student id (-1: none)."""
    width = reader.manifest.num_classes
    tok = reader.manifest.vocab.get("tokenizer_size", width)
    if student_vocab == width and not spec.vocab_map:
        return None
    if not spec.vocab_map:
        raise ValueError(f"the student's vocabulary has {student_vocab} ids but the teacher's logits are {width} wide "
                         f"(its tokenizer has {tok} tokens): set the student's vocab_map=truncate (student ids are the "
                         f"teacher's first {student_vocab}, e.g. a padded teacher vocabulary) or vocab_map=<file.npy> "
                         f"mapping each of the {width} teacher ids to a student id (-1: none)")
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


def map_batch(batch: SequenceBatch, vmap: np.ndarray | None) -> SequenceBatch:
    """Inputs and teacher rows in the student's ids. A cached top-K entry with no student id
    gets probability 0 (its mass joins the tail) and points at a kept id of the same row,
    placed first so the kept entry's gradient wins; a sampled draw with none is dropped."""
    if vmap is None:
        return batch
    ids = vmap[batch.input_ids.numpy()]
    if (ids[batch.attention_mask.numpy() == 1] < 0).any():
        raise ValueError("the batch holds input tokens the vocab_map leaves unmapped; the student cannot read them")
    t = dict(batch.teacher)
    if TOPK_IDX in t:
        idx, val = vmap[t[TOPK_IDX]], t[TOPK_VAL].copy()
        dropped = idx < 0
        order = np.argsort(~dropped, axis=1, kind="stable")  # dropped entries first
        idx, val, dropped = (np.take_along_axis(a, order, 1) for a in (idx, val, dropped))
        fill = np.where(dropped.all(1), 0, idx[np.arange(len(idx)), dropped.sum(1).clip(max=idx.shape[1] - 1)])
        idx = np.where(dropped, fill[:, None], idx)
        val[dropped] = -1e4  # p = exp(-1e4 / T - lse): 0 in torch, below 1e-37 in the kernels' clamped exp
        t[TOPK_IDX], t[TOPK_VAL] = idx.astype(np.int32), val
    if SAMPLED_IDX in t:
        sid = t[SAMPLED_IDX]
        mapped = np.where(sid >= 0, vmap[sid.clip(min=0)], -1)
        t[SAMPLED_CNT] = np.where(mapped >= 0, t[SAMPLED_CNT], 0).astype(t[SAMPLED_CNT].dtype)
        t[SAMPLED_IDX] = mapped.astype(np.int32)
        mask = batch.mask & (t[SAMPLED_CNT].sum(axis=1) > 0)  # no draw left: nothing to distil there
    else:
        mask = batch.mask
    return dataclasses.replace(batch, input_ids=torch.from_numpy(np.maximum(ids, 0)), teacher=t, mask=mask)


# --- losses --------------------------------------------------------------------------------


def student_logits(student, batch: SequenceBatch, device) -> torch.Tensor:
    """(B, L, V) logits of the student over a padded batch."""
    return student(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits


def next_token_nll(logits: torch.Tensor, batch: SequenceBatch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each real position against the next real token."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)


def first_k(batch: SequenceBatch, k: int) -> SequenceBatch:
    """Only the first k of the cached top-K (sorted, largest first): what a K=k cache holds.
    Applied before any vocabulary mapping, which reorders entries."""
    if not k or TOPK_IDX not in batch.teacher or k >= batch.teacher[TOPK_IDX].shape[1]:
        return batch
    t = dict(batch.teacher)
    t[TOPK_IDX], t[TOPK_VAL] = (np.ascontiguousarray(t[n][:, :k]) for n in (TOPK_IDX, TOPK_VAL))
    return dataclasses.replace(batch, teacher=t)


def teacher_rows(batch: SequenceBatch, v: Variant, lse_col: int) -> tuple:
    t = batch.teacher
    if v.name == "topk_kl":
        return t[TOPK_IDX], t[TOPK_VAL], np.ascontiguousarray(t[LSE][:, lse_col])
    return t[SAMPLED_IDX], t[SAMPLED_CNT], t[SAMPLED_ENT]


def variant_loss(student, batch: SequenceBatch, v: Variant, cfg: Config, lse_col: int, device) -> torch.Tensor:
    logits = student_logits(student, batch, device)
    ce = next_token_nll(logits, batch)
    if v.name == "labels":
        return ce
    flat = logits.reshape(-1, logits.shape[-1])  # (B * L, V): the kernels' rows, padding masked out
    rows = teacher_rows(batch, v, lse_col)
    if device.type != "cpu":
        rows = tuple(torch.as_tensor(a).to(device) for a in rows)
    fn = topk_kl_loss if v.name == "topk_kl" else sampled_kl_loss
    kd = fn(flat, *rows, temperature=cfg.loss.temperature, mask=batch.mask, coef=cfg.loss.lam)
    return cfg.loss.alpha * ce + kd


# --- training and evaluation ---------------------------------------------------------------


def lse_column(reader: CacheReader, temperature: float) -> int:
    temps = reader.manifest.temperatures
    if temperature not in temps:
        raise ValueError(f"loss.temperature={temperature} is not one of the cache's temperatures {temps}; "
                         "use one of them or capture with it in cache.temperatures")
    return temps.index(temperature)


@torch.no_grad()
def evaluate(student, reader: CacheReader, data: TokenData, cfg: Config, vmap, device) -> dict:
    """Held-out perplexity, and KL(teacher || student) over the cached top-K + tail at T=1."""
    student.eval()
    arrays = TOPK_ARRAYS if "topk" in reader.manifest.modes and 1.0 in reader.manifest.temperatures else ()
    col = lse_column(reader, 1.0) if arrays else 0
    stream = SequenceStream(reader, data.tokens, split="heldout", batch_size=cfg.lm.eval_batch_size, seed=0,
                            arrays=arrays)
    nll, count, kl, kl_rows = 0.0, 0, 0.0, 0
    for batch in stream:
        batch = map_batch(batch, vmap)
        logits = student_logits(student, batch, device)
        tokens = int((batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).sum())
        nll += next_token_nll(logits, batch, reduction="sum").item()
        count += tokens
        if arrays:
            keep = torch.from_numpy(batch.mask)
            flat = logits.reshape(-1, logits.shape[-1])[keep.to(device)].float()
            idx, val, lse = (torch.from_numpy(batch.teacher[n][batch.mask]).to(device) for n in TOPK_ARRAYS)
            kl += torch_topk_kl(flat, idx, val, lse[:, col], 1.0).sum().item()
            kl_rows += len(flat)
    student.train()
    return {"heldout_perplexity": math.exp(nll / count), "heldout_nll": nll / count, "heldout_tokens": count,
            "heldout_kl_topk": kl / kl_rows if kl_rows else None}


def train_variant(name: str, spec, v: Variant, cfg: Config, reader: CacheReader, data: TokenData,
                  device: torch.device, save_dir: str | None = None) -> dict:
    vocab = int(spec.kwargs.get("vocab_size", reader.manifest.num_classes))
    vmap = vocab_map(spec, reader, vocab)
    lse_col = lse_column(reader, cfg.loss.temperature) if v.name == "topk_kl" else 0
    if v.name == "sampled_kl" and cfg.loss.temperature != reader.manifest.sample_temperature:
        raise ValueError(f"sampled_kl needs loss.temperature={reader.manifest.sample_temperature} (the cache's "
                         f"sample_temperature), not {cfg.loss.temperature}")
    student = build_student(spec, vocab, cfg.data.seq_len, cfg.train.seed).to(device)
    opt, sched = make_optimizer(student, cfg.train.lr, cfg.train.weight_decay, cfg.train.steps)
    stream = SequenceStream(reader, data.tokens, split="train", batch_size=cfg.train.batch_size,
                            seed=cfg.train.seed, arrays=v.arrays)
    t0, step, loss = time.perf_counter(), 0, torch.zeros(())
    with tqdm(total=cfg.train.steps, desc=f"{name}: {v.label}", unit="step") as bar:
        while step < cfg.train.steps:
            for batch in stream:
                loss = variant_loss(student, map_batch(first_k(batch, v.k), vmap), v, cfg, lse_col, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= cfg.train.steps:
                    break
    took = time.perf_counter() - t0
    row = {"student": name, "variant": v.label, "bytes_per_token": bytes_per_token(v, reader), "steps": step,
           "params": sum(p.numel() for p in student.parameters()), "train_s": took,
           "tokens_per_s": step * cfg.train.batch_size * cfg.data.seq_len / took, "final_loss": loss.item()}
    row |= evaluate(student, reader, data, cfg, vmap, device)
    if save_dir:  # a standard HF folder (config.json + model.safetensors)
        row["checkpoint"] = os.path.join(save_dir, name, v.label.replace(":", "-"))
        student.save_pretrained(row["checkpoint"])
    log.info("%s %s: held-out perplexity %.2f, KL %.4f", name, v.label, row["heldout_perplexity"],
             row["heldout_kl_topk"] or float("nan"))
    return row


def format_lm_results(rows: list[dict], teacher: dict, full_bytes: int) -> str:
    lines = ["| student | trained on | bytes/token | held-out perplexity | held-out KL (top-K+tail) | steps | time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    if teacher:
        lines.append(f"| teacher | - | {full_bytes:,} (full fp16) | {teacher['heldout_perplexity']:.2f} | 0 | - | - |")
    for r in rows:
        kl = f"{r['heldout_kl_topk']:.4f}" if r["heldout_kl_topk"] is not None else "-"
        lines.append(f"| {r['student']} | {r['variant']} | {r['bytes_per_token']} | {r['heldout_perplexity']:.2f} | "
                     f"{kl} | {r['steps']} | {r['train_s']:.0f}s |")
    return "\n".join(lines)


def write_lm_results(run_dir: str, reader: CacheReader, rows: list[dict]) -> dict:
    teacher = read_teacher_eval(reader.storage)
    full = reader.manifest.num_classes * 2
    results = {"cache": reader.path, "teacher": teacher, "full_fp16_bytes_per_token": full, "students": rows}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
