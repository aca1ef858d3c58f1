"""Stage 1's core: run the teacher over every split once and write its outputs.

The loop unit is the shard: shards already committed (an earlier, interrupted run) are
skipped; each remaining shard is computed in batches under ``torch.inference_mode``, its
representations (full / top-k / sampled) are computed on the device, copied into host
buffers (pinned and non-blocking on CUDA) and handed to the background writer, which
encodes and writes the shard while the next one is computed.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import CacheWriter, Manifest, ShardRecord, make_fingerprint, plan_shards
from pipeline.cache.fingerprint import (
    capture_settings,
    hash_json,
    hash_state_dict,
    teacher_identity,
)
from pipeline.cache.format import FORMAT_VERSION, IDS, array_specs, row_bytes
from pipeline.cache.storage import Storage
from pipeline.config import Config, resolve_workers
from pipeline.datasets import Splits
from pipeline.device import autocast, choose_device
from pipeline.representations import host_arrays, represent, torch_buffer_dtype

log = logging.getLogger(__name__)

_MAX_CHUNK_BYTES = 8 << 20


def plan_manifest(cfg: Config, splits: Splits, teacher: torch.nn.Module) -> Manifest:
    c = cfg.cache
    rows = sum(len(s.y) for s in splits.splits.values())
    m = Manifest(backend=c.format.value, modes=sorted(x.value for x in c.modes), dtype=c.dtype.value,
                 num_classes=splits.num_classes, rows=rows, chunk_rows=c.chunk_rows, shard_rows=0,
                 splits={k: list(v) for k, v in splits.ranges().items()}, fingerprint={},
                 k=c.k if "topk" in [x.value for x in c.modes] else 0,
                 samples=c.samples if "sampled" in [x.value for x in c.modes] else 0,
                 temperatures=list(c.temperatures), sample_temperature=c.sample_temperature,
                 compression=c.zstd.value)
    widest = max(row_bytes(m, (mode,)) for mode in m.modes)
    m.chunk_rows = min(c.chunk_rows, max(1, _MAX_CHUNK_BYTES // max(widest, 1)))
    if m.chunk_rows < c.chunk_rows:
        log.info("cache.chunk_rows %d -> %d to keep a chunk under %d MiB", c.chunk_rows, m.chunk_rows,
                 _MAX_CHUNK_BYTES >> 20)
    m.shard_rows = m.chunk_rows * c.shard_chunks
    m.shards = plan_shards(rows, m.shard_rows)
    m.fingerprint = make_fingerprint({
        "format_version": FORMAT_VERSION,
        "dataset": splits.content_hash(),
        "teacher_config": hash_json(teacher_identity(cfg)),
        "teacher_weights": hash_state_dict(teacher),
        "capture": capture_settings(cfg, splits.num_classes),
    })
    return m


def check_size(m: Manifest, max_full_gb: float) -> None:
    """Print the projected size of each representation; refuse a `full` capture above the limit."""
    sizes = {mode: m.rows * row_bytes(m, (mode,)) / 1e9 for mode in m.modes}
    log.info("projected cache size (uncompressed): %s",
             ", ".join(f"{k} {v:.3g} GB ({row_bytes(m, (k,))} B/row)" for k, v in sizes.items()))
    if sizes.get("full", 0.0) > max_full_gb:
        raise ValueError(f"a `full` cache of {m.rows} rows x {m.num_classes} classes in {m.dtype} would take "
                         f"{sizes['full']:.1f} GB, above cache.max_full_gb={max_full_gb}: capture "
                         f"cache.modes=[topk] (K={m.k}: {m.rows * row_bytes(m, ('topk',)) / 1e9:.2f} GB) or "
                         f"[sampled], or raise cache.max_full_gb")


def _check_shape(logits: torch.Tensor, cfg: Config) -> None:
    if logits.ndim != 2 or logits.shape[1] != cfg.data.num_classes:
        raise ValueError(f"teacher output has shape {tuple(logits.shape)}; expected (batch, {cfg.data.num_classes}) "
                         "= data.num_classes: set data.num_classes to the teacher's output width")


def check_values(finite: torch.Tensor, peak: float, first_row: int, cfg: Config) -> None:
    """Refuse non-finite rows (``finite``: one flag per row) and float16 overflow."""
    if not finite.all():
        rows = (torch.nonzero(~finite).flatten()[:10] + first_row).tolist()
        raise ValueError(f"teacher produced non-finite logits at rows {rows}; refusing to cache them")
    if cfg.cache.dtype.value == "float16" and peak > 65504:
        raise ValueError(f"teacher logits reach {peak:.4g}, beyond float16's range; "
                         "use cache.dtype=bfloat16 or float32")


def _check_logits(logits: torch.Tensor, first_row: int, cfg: Config) -> None:
    """Shape, finiteness and range of one batch (capture checks values once per shard)."""
    _check_shape(logits, cfg)
    check_values(torch.isfinite(logits).all(dim=1), logits.abs().max().item(), first_row, cfg)


def host_buffers(m: Manifest, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Host buffers for one shard, pinned when the teacher runs on CUDA (non-blocking copies)."""
    pin = device.type == "cuda"
    return {name: torch.empty((rows, *shape), dtype=torch_buffer_dtype(name, dt), pin_memory=pin)
            for name, (shape, dt) in array_specs(m).items() if name != IDS}


def capture_shard(teacher, x: np.ndarray, shard: ShardRecord, m: Manifest, cfg: Config,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Every array of one shard: teacher forward in batches, representations on the device."""
    buffers = host_buffers(m, shard.rows, device)
    gen = torch.Generator(device=device).manual_seed(shard.index)  # resumable sampling: seeded per shard
    finite = torch.empty(shard.rows, dtype=torch.bool, device=device)
    peak = torch.zeros((), device=device)
    for i in range(0, shard.rows, cfg.teacher.batch_size):
        xb = torch.from_numpy(x[i:i + cfg.teacher.batch_size]).to(device, non_blocking=True)
        with autocast(device, cfg.teacher.precision.value):
            logits = teacher(xb).float()  # (B, C)
        _check_shape(logits, cfg)
        finite[i:i + len(xb)] = torch.isfinite(logits).all(dim=1)  # checked once per shard: no
        peak = torch.maximum(peak, logits.abs().amax())  # device sync per batch
        for name, values in represent(logits, m, gen).items():  # non-finite rows are refused below
            buffers[name][i:i + len(xb)].copy_(values, non_blocking=True)
    check_values(finite.cpu(), peak.item(), shard.start, cfg)  # before anything is handed to the writer
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the non-blocking copies have landed
    arrays = host_arrays(buffers, m)
    arrays[IDS] = np.arange(shard.start, shard.stop, dtype=np.int64)
    return arrays


@torch.inference_mode()
def capture_logits(teacher: torch.nn.Module, splits: Splits, cfg: Config, cache_url: str) -> Manifest:
    """Write the teacher's outputs over every split to ``cache_url``; resume if started."""
    device = choose_device(cfg.teacher.device)
    teacher = teacher.to(device).eval()
    m = plan_manifest(cfg, splits, teacher)
    check_size(m, cfg.cache.max_full_gb)
    x_all, _ = splits.concat()
    t0 = time.perf_counter()
    storage = Storage(cache_url, cfg.cache.storage_options)
    rank, world = resolve_workers(cfg)
    with CacheWriter(storage=storage, manifest=m, zstd_level=cfg.cache.zstd_level, rank=rank,
                     world_size=world, overwrite=cfg.cache.overwrite, verify=cfg.verify) as writer:
        todo = writer.pending()
        log.info("capture: rank %d of %d writes %d shard(s) to %s", rank, world, len(todo), cache_url)
        desc = "stage 1: teacher" if world == 1 else f"stage 1: teacher (rank {rank}/{world})"
        with tqdm(total=sum(s.rows for s in todo), desc=desc, unit="row", unit_scale=True) as bar:
            for shard in writer.claim():
                writer.submit(shard, capture_shard(teacher, x_all[shard.start:shard.stop], shard, m, cfg, device))
                bar.update(shard.rows)
    state = "complete" if writer.manifest.complete else "waiting for other workers' shards"
    log.info("rank %d wrote %d shard(s) in %.1fs; cache %s (%d rows, modes %s, %s) is %s", rank, len(writer.written),
             time.perf_counter() - t0, cache_url, m.rows, m.modes, m.dtype, state)
    return writer.manifest
