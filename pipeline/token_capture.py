"""Stage 1 for task=lm: a causal LM teacher over token sequences, one cache row per real
token (padding is never cached), ``offsets`` mapping sequences to rows.

Shards are fixed ranges of token rows, so a sequence can straddle two shards: each shard
runs the teacher over every sequence it overlaps and keeps its own rows (at most one
sequence per shard boundary is computed twice). A shard is resumable on its own, and its
sampling generator is seeded by its index, so an interrupted capture resumes to the same
cache.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import CacheWriter, Manifest, ShardRecord, make_fingerprint, plan_shards
from pipeline.cache.fingerprint import cache_location, capture_settings, hash_json, key_from
from pipeline.cache.format import FORMAT_VERSION, IDS, offsets_digest
from pipeline.cache.storage import Storage
from pipeline.capture import check_size, check_values, host_buffers
from pipeline.causal_lm import LMTeacher
from pipeline.config import Config, resolve_workers
from pipeline.device import choose_device
from pipeline.representations import host_arrays, represent
from pipeline.text import TokenData

log = logging.getLogger(__name__)

TEACHER_EVAL = "teacher_eval.json"


def token_fields(cfg: Config, data: TokenData, teacher_identity: dict) -> dict:
    """The fingerprint fields of a token cache; stage 3 recomputes them without the model."""
    return {"format_version": FORMAT_VERSION, "dataset": data.content_hash(),
            "teacher": hash_json(teacher_identity), "capture": capture_settings(cfg, cfg.data.num_classes)}


def plan_token_manifest(cfg: Config, data: TokenData, teacher: LMTeacher) -> Manifest:
    c, modes = cfg.cache, sorted(x.value for x in cfg.cache.modes)
    rows = int(data.offsets[-1])
    width = teacher.model.get_output_embeddings().weight.shape[0]
    if width != cfg.data.num_classes:
        raise ValueError(f"the teacher's logit width is {width} but data.num_classes={cfg.data.num_classes}: "
                         f"set data.num_classes={width}")
    shard_rows = c.chunk_rows * c.shard_chunks
    return Manifest(backend=c.format.value, modes=modes, dtype=c.dtype.value, num_classes=width, rows=rows,
                    chunk_rows=c.chunk_rows, shard_rows=shard_rows,
                    splits={name: list(data.rows(name)) for name in data.sequences},
                    fingerprint=make_fingerprint(token_fields(cfg, data, teacher.identity)),
                    k=c.k if "topk" in modes else 0, samples=c.samples if "sampled" in modes else 0,
                    temperatures=list(c.temperatures), sample_temperature=c.sample_temperature,
                    shards=plan_shards(rows, shard_rows), compression=c.zstd.value,
                    sequences=len(data.offsets) - 1, offsets_sha256=offsets_digest(data.offsets),
                    vocab={"logit_width": width, "tokenizer_size": len(teacher.tokenizer)})


def pad_batch(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) token ids and attention mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(s)
        mask[i, :len(s)] = 1
    return ids, mask


def teacher_logits(model, seqs: list[np.ndarray], pad_id: int, device: torch.device) -> torch.Tensor:
    """(B, L, V) float32 logits of right-padded sequences."""
    ids, mask = pad_batch(seqs, pad_id)
    out = model(input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True))
    return out.logits.float()


def capture_token_shard(model, data: TokenData, shard: ShardRecord, m: Manifest, cfg: Config,
                        device: torch.device, pad_id: int, bar) -> dict[str, np.ndarray]:
    """Every array of one shard: the teacher over the sequences it overlaps, real tokens only."""
    off = data.offsets
    first = int(np.searchsorted(off, shard.start, side="right")) - 1
    last = int(np.searchsorted(off, shard.stop, side="left"))  # sequences [first, last) overlap the shard
    buffers = host_buffers(m, shard.rows, device)
    ids = np.repeat(np.arange(first, last), np.diff(off[first:last + 1]))[
        shard.start - off[first]:shard.stop - off[first]]
    gen = torch.Generator(device=device).manual_seed(shard.index)
    finite = torch.empty(shard.rows, dtype=torch.bool, device=device)
    peak = torch.zeros((), device=device)
    for b in range(first, last, cfg.teacher.batch_size):
        seqs = list(range(b, min(b + cfg.teacher.batch_size, last)))
        logits = teacher_logits(model, [data.sequence(i) for i in seqs], pad_id, device)  # (B, L, V)
        if logits.shape[-1] != m.num_classes:
            raise ValueError(f"teacher logits are {logits.shape[-1]} wide; the cache expects {m.num_classes}")
        n_real = [min(off[i + 1], shard.stop) - max(off[i], shard.start) for i in seqs]
        rows = logits.reshape(-1, logits.shape[-1])
        if sum(n_real) != len(rows):  # padding or a straddling sequence: keep this shard's real tokens
            keep = [j * logits.shape[1] + torch.arange(max(off[i], shard.start) - off[i],
                                                       min(off[i + 1], shard.stop) - off[i])
                    for j, i in enumerate(seqs)]
            rows = rows[torch.cat(keep).to(device)]  # (n, V)
        d0 = max(off[seqs[0]], shard.start) - shard.start
        d1 = d0 + len(rows)
        reps = represent(rows, m, gen)
        if "full" in m.modes:  # every logit is stored: check every logit
            ok, top = torch.isfinite(rows).all(dim=1), rows.abs().amax()
        else:  # NaN / inf in a row make its logsumexp or entropy non-finite
            ok, top = _stored_health(reps)
        finite[d0:d1] = ok
        peak = torch.maximum(peak, top)
        for name, values in reps.items():
            buffers[name][d0:d1].copy_(values, non_blocking=True)
        bar.update(d1 - d0)
    check_values(finite.cpu(), peak.item(), shard.start, cfg)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    arrays = host_arrays(buffers, m)
    arrays[IDS] = ids.astype(np.int64)
    return arrays


def _stored_health(reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, whether its float32 outputs are finite (a NaN or +inf logit makes the row's
    logsumexp or entropy non-finite), and the largest float16 value stored (an overflow
    shows as inf there and is reported as out of float16's range)."""
    f32 = [v.reshape(len(v), -1) for v in reps.values() if v.dtype == torch.float32]
    ok = torch.stack([torch.isfinite(v).all(dim=1) for v in f32]).all(dim=0)
    f16 = [v.float().abs().amax() for v in reps.values() if v.dtype == torch.float16 and v.numel()]
    return ok, (torch.stack(f16).amax() if f16 else torch.zeros((), device=ok.device)).nan_to_num(float("inf"))


@torch.inference_mode()
def teacher_heldout_nll(model, data: TokenData, cfg: Config, device: torch.device, pad_id: int) -> dict:
    """The teacher's next-token loss on the held-out sequences (its perplexity)."""
    a, z = data.sequences["heldout"]
    total, count = 0.0, 0
    for b in range(a, z, cfg.teacher.batch_size):
        seqs = [data.sequence(i) for i in range(b, min(b + cfg.teacher.batch_size, z))]
        logp = torch.log_softmax(teacher_logits(model, seqs, pad_id, device), dim=-1)
        for j, s in enumerate(seqs):
            target = torch.from_numpy(s[1:]).to(device)
            total -= logp[j, :len(s) - 1].gather(1, target[:, None]).sum().item()
            count += len(s) - 1
    return {"heldout_tokens": count, "heldout_nll": total / count, "heldout_perplexity": float(np.exp(total / count))}


@torch.inference_mode()
def capture_tokens(teacher: LMTeacher, data: TokenData, cfg: Config, cache_url: str) -> Manifest:
    """Write the teacher's per-token rows over every sequence to ``cache_url``; resume if started."""
    device = choose_device(cfg.teacher.device)
    model = teacher.model.to(device)
    m = plan_token_manifest(cfg, data, teacher)
    check_size(m, cfg.cache.max_full_gb)
    storage = Storage(cache_url, cfg.cache.storage_options)
    rank, world = resolve_workers(cfg)
    t0 = time.perf_counter()
    with CacheWriter(storage=storage, manifest=m, zstd_level=cfg.cache.zstd_level, rank=rank, world_size=world,
                     offsets=data.offsets, overwrite=cfg.cache.overwrite, verify=cfg.verify) as writer:
        todo = writer.pending()
        log.info("capture: %d tokens in %d sequences; rank %d of %d writes %d shard(s) to %s",
                 m.rows, m.sequences, rank, world, len(todo), cache_url)
        with tqdm(total=sum(s.rows for s in todo), desc="stage 1: teacher", unit="tok", unit_scale=True) as bar:
            for shard in writer.claim():
                writer.submit(shard, capture_token_shard(model, data, shard, m, cfg, device, teacher.pad_id, bar))
    log.info("rank %d wrote %d token rows in %.1fs to %s", rank, sum(m.shards[i].rows for i in writer.written),
             time.perf_counter() - t0, cache_url)
    return writer.manifest


def read_teacher_eval(storage: Storage) -> dict:
    """The teacher's held-out evaluation stored beside the cache ({} before stage 1 wrote it)."""
    return json.loads(storage.read_bytes(TEACHER_EVAL)) if storage.exists(TEACHER_EVAL) else {}


@torch.inference_mode()
def evaluate_teacher(teacher: LMTeacher, data: TokenData, cfg: Config, cache_url: str) -> dict:
    """The teacher's held-out perplexity, stored beside the cache (``teacher_eval.json``) so
    stage 3 compares students with it without loading the teacher. Computed once."""
    storage = Storage(cache_url, cfg.cache.storage_options)
    if ev := read_teacher_eval(storage):
        return ev
    device = choose_device(cfg.teacher.device)
    ev = teacher_heldout_nll(teacher.model.to(device), data, cfg, device, teacher.pad_id)
    storage.write_atomic(json.dumps(ev, indent=2).encode(), TEACHER_EVAL)
    log.info("teacher held-out perplexity %.2f over %d tokens", ev["heldout_perplexity"], ev["heldout_tokens"])
    return ev


def lm_cache_location(cfg: Config, root: str, data: TokenData) -> str:
    """``cache.path`` when set, else ``<root>/caches/<data>-<teacher>-<key>``, the key from
    the config and the token data (no model needed)."""
    t = asdict(cfg.teacher)
    teacher = {k: t[k] for k in ("name", "path", "gguf_file", "precision")}
    return cache_location(cfg, root, key_from(cfg, {"teacher": teacher, "data": data.content_hash()}))


def open_token_cache(cfg: Config, root: str):
    """Stages 2 and 3: the token data and the cache that matches it (fingerprint checked),
    from the tokenizer and the weight files' hash: the model itself is never loaded."""
    from pipeline.cache import open_cache
    from pipeline.causal_lm import load_tokenizer, teacher_identity
    from pipeline.text import load_tokens

    tokenizer = load_tokenizer(cfg.teacher)
    data = load_tokens(cfg.data, root, tokenizer)
    url = lm_cache_location(cfg, root, data)
    expected = token_fields(cfg, data, teacher_identity(cfg.teacher, tokenizer))
    reader = open_cache(url, expected=expected, storage_options=cfg.cache.storage_options,
                        num_classes=cfg.data.num_classes)
    if not np.array_equal(reader.offsets, data.offsets):
        raise ValueError(f"cache {url!r}: its offsets differ from the token data's; re-run stage 1")
    return reader, data
