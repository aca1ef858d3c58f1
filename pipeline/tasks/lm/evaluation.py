"""Held-out evaluation of task=lm: the teacher's perplexity (kept beside the cache), the
students' perplexity, bits per byte and KL to the cached teacher, and the results table."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import torch

from pipeline.cache import CacheReader, Storage
from pipeline.cache.format import LSE, TOPK_IDX, TOPK_VAL, task_file
from pipeline.losses import select_teacher, torch_topk_kl
from pipeline.sequence_stream import SequenceStream
from pipeline.tasks.lm.objective import next_token_nll, student_logits, to_student
from pipeline.tasks.lm.rows import teacher_logits
from pipeline.tasks.lm.text import TokenData

log = logging.getLogger(__name__)

TEACHER_EVAL = task_file("teacher_eval.json")  # the teacher's held-out perplexity, beside the cache
# the teacher's top-1 probability at T=1 (from its cached top-K and logsumexp): where a
# student's held-out loss is reported apart (a distilled student against its twin, by bin)
CONFIDENCE_BINS = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.01))

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
    try:
        return json.loads(storage.read_bytes(TEACHER_EVAL))  # (one request, not an exists() first)
    except FileNotFoundError:
        return {}




@torch.no_grad()
def evaluate_student(student, reader: CacheReader, data: TokenData, batch_size: int, adapter, device) -> dict:
    """Held-out perplexity (of the student's tokens), and KL(teacher || student) over the
    cached top-K + tail at T=1 at the positions with a teacher row (with another tokenizer:
    the aligned ones, the rows projected onto the student's ids); the held-out NLL by the
    teacher's top-1 probability there (CONFIDENCE_BINS; positions without a teacher row in
    none), and by whether the next token is among the cached top-K (outside it, the top-K
    says only that its mass is in the tail), to see where distillation moves a student's loss."""
    student.eval()
    m = reader.manifest
    arrays = (TOPK_IDX, TOPK_VAL, LSE) if "topk" in m.modes and 1.0 in m.temperatures else ()
    col = m.temperatures.index(1.0) if arrays else 0
    stream = SequenceStream(reader, data.tokens, split="heldout", batch_size=batch_size, seed=0, arrays=arrays,
                            token_offsets=data.offsets)
    nll, count, kl, kl_rows = 0.0, 0, 0.0, 0
    by_conf = np.zeros((2, len(CONFIDENCE_BINS)))  # (NLL sum, tokens) per bin of the teacher's confidence
    by_held = np.zeros((2, 2))  # (NLL sum, tokens): the next token outside / inside the cached top-K
    for batch in stream:
        batch = to_student(dataclasses.replace(batch, teacher=select_teacher(batch.teacher, col)) if arrays
                           else batch, adapter)
        logits = student_logits(student, batch, device)
        per = next_token_nll(logits, batch, reduction="none").view(len(logits), -1).cpu().numpy()
        scored = batch.label_mask().numpy()
        nll += float(per[scored].sum())
        count += int(scored.sum())
        if arrays:
            rows = batch.teacher_mask()
            flat = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(rows).to(device)].float()
            idx, val, lse = (torch.from_numpy(batch.teacher[n][rows]).to(device) for n in arrays)
            kl += torch_topk_kl(flat, idx, val, lse, 1.0).sum().item()
            kl_rows += len(flat)
            conf = np.full(rows.shape, np.nan)  # the teacher's top-1 probability at each row's position
            conf[rows] = np.exp(batch.teacher[TOPK_VAL][rows][:, 0].astype(np.float64) - batch.teacher[LSE][rows])
            conf = conf.reshape(logits.shape[:2])[:, :-1]
            for b, (lo, hi) in enumerate(CONFIDENCE_BINS):
                sel = scored & (conf >= lo) & (conf < hi)
                by_conf[:, b] += per[sel].sum(), sel.sum()
            held = np.zeros(rows.shape, bool)  # whether the next token is among the row's cached top-K
            nxt = np.zeros(logits.shape[:2], np.int64)
            nxt[:, :-1] = batch.input_ids[:, 1:].numpy()
            held[rows] = (batch.teacher[TOPK_IDX][rows] == nxt.reshape(-1)[rows][:, None]).any(1)
            held = held.reshape(logits.shape[:2])[:, :-1]
            for b, sel in enumerate((scored & ~held & np.isfinite(conf), scored & held)):
                by_held[:, b] += per[sel].sum(), sel.sum()
    student.train()
    out = {"heldout_perplexity": math.exp(nll / count), "heldout_nll": nll / count, "heldout_tokens": count,
           "heldout_kl_topk": kl / kl_rows if kl_rows else None}
    if arrays:
        out["heldout_nll_by_teacher_confidence"] = {
            f"{lo:g}-{min(hi, 1):g}": {"tokens": int(n), "nll": s / n if n else None}
            for (lo, hi), s, n in zip(CONFIDENCE_BINS, *by_conf, strict=True)}
        out["heldout_nll_by_target_in_topk"] = {
            name: {"tokens": int(n), "nll": s / n if n else None}
            for name, s, n in zip(("outside", "inside"), *by_held, strict=True)}
    return out


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
