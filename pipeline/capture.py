"""Stage 1's core: run the teacher over every split once and write its logits.

The loop unit is the shard: shards already committed (an earlier, interrupted run) are
skipped; each remaining shard is computed in batches under ``torch.inference_mode``,
cast to the cache dtype on the device, copied to the host and handed to the background
writer, which encodes and writes it while the next shard is computed.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import CacheWriter, Manifest, ShardRecord, make_fingerprint, plan_shards
from pipeline.cache.fingerprint import capture_settings, hash_json, hash_state_dict, teacher_identity
from pipeline.cache.format import FORMAT_VERSION
from pipeline.config import Config
from pipeline.datasets import Splits
from pipeline.device import autocast, choose_device

log = logging.getLogger(__name__)

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_CHUNK_BYTES = 8 << 20


def plan_manifest(cfg: Config, splits: Splits, teacher: torch.nn.Module) -> Manifest:
    rows = sum(len(s.y) for s in splits.splits.values())
    row_bytes = splits.num_classes * (4 if cfg.cache.dtype.value == "float32" else 2)
    chunk_rows = min(cfg.cache.chunk_rows, max(1, _MAX_CHUNK_BYTES // row_bytes))
    if chunk_rows < cfg.cache.chunk_rows:
        log.info("cache.chunk_rows %d -> %d to keep a chunk under %d MiB", cfg.cache.chunk_rows, chunk_rows,
                 _MAX_CHUNK_BYTES >> 20)
    fields = {
        "format_version": FORMAT_VERSION,
        "dataset": splits.content_hash(),
        "teacher_config": hash_json(teacher_identity(cfg)),
        "teacher_weights": hash_state_dict(teacher),
        "capture": capture_settings(cfg, splits.num_classes),
    }
    shard_rows = chunk_rows * cfg.cache.shard_chunks
    return Manifest(backend=cfg.cache.format.value, modes=["full"], dtype=cfg.cache.dtype.value,
                    num_classes=splits.num_classes, rows=rows, chunk_rows=chunk_rows, shard_rows=shard_rows,
                    splits={k: list(v) for k, v in splits.ranges().items()},
                    fingerprint=make_fingerprint(fields), shards=plan_shards(rows, shard_rows))


def _host_array(logits: torch.Tensor, dtype: str) -> np.ndarray:
    out = logits.to(_TORCH_DTYPE[dtype])
    if dtype == "bfloat16":
        out = out.view(torch.int16)  # raw bits; stored as uint16
    host = out.cpu().numpy()
    return host.view(np.uint16) if dtype == "bfloat16" else host


def _teacher_rows(teacher, x: np.ndarray, start: int, cfg: Config, device: torch.device) -> np.ndarray:
    """Teacher logits for ``x`` in batches, cast to the cache dtype; refuses bad output."""
    out = []
    for i in range(0, len(x), cfg.teacher.batch_size):
        xb = torch.from_numpy(x[i:i + cfg.teacher.batch_size]).to(device, non_blocking=True)
        with autocast(device, cfg.teacher.precision.value):
            logits = teacher(xb).float()  # (B, C)
        _check_logits(logits, start + i, cfg)
        out.append(_host_array(logits, cfg.cache.dtype.value))
    return np.concatenate(out)


def _check_logits(logits: torch.Tensor, first_row: int, cfg: Config) -> None:
    if logits.ndim != 2 or logits.shape[1] != cfg.data.num_classes:
        raise ValueError(f"teacher output has shape {tuple(logits.shape)}; expected (batch, {cfg.data.num_classes}) "
                         "= data.num_classes: set data.num_classes to the teacher's output width")
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        rows = (torch.nonzero(bad).flatten()[:10] + first_row).tolist()
        raise ValueError(f"teacher produced non-finite logits at rows {rows}; refusing to cache them")
    if cfg.cache.dtype.value == "float16" and logits.abs().max() > 65504:
        raise ValueError(f"teacher logits reach {logits.abs().max().item():.4g}, beyond float16's range; "
                         "use cache.dtype=bfloat16 or float32")


@torch.inference_mode()
def capture_logits(teacher: torch.nn.Module, splits: Splits, cfg: Config, cache_dir: str) -> Manifest:
    """Write the teacher's logits over every split to ``cache_dir``; resume if started."""
    device = choose_device(cfg.teacher.device)
    teacher = teacher.to(device).eval()
    manifest = plan_manifest(cfg, splits, teacher)
    x_all, _ = splits.concat()
    t0 = time.perf_counter()
    with CacheWriter(cache_dir=cache_dir, manifest=manifest, zstd_level=cfg.cache.zstd_level) as writer:
        todo: list[ShardRecord] = writer.pending()
        with tqdm(total=sum(s.rows for s in todo), desc="stage 1: teacher logits", unit="row",
                  unit_scale=True) as bar:
            for shard in todo:
                logits = _teacher_rows(teacher, x_all[shard.start:shard.stop], shard.start, cfg, device)
                writer.submit(shard, np.arange(shard.start, shard.stop, dtype=np.int64), logits)
                bar.update(shard.rows)
    log.info("cache written: %s (%d rows x %d, %s) in %.1fs", cache_dir, manifest.rows, manifest.num_classes,
             manifest.dtype, time.perf_counter() - t0)
    return writer.manifest
