"""Stage 1's engine, for every task: run the teacher over the rows of each shard once and
write what it outputs.

A task hands the engine a :class:`RowSource`: for a shard, the teacher's logits over its
rows in pieces (a classifier: a batch of samples; a language model: the real tokens of
the sequences a batch covers), and the ``ids`` of those rows. Everything else is here,
once: the shard plan (chunks clamped to 8 MiB), the projected size and its guard, the
representations (full / top-k / sampled) computed on the device, the health checks
(finiteness, float16 range; one device sync per shard), host buffers (pinned, non-blocking
copies on CUDA), the background writer, resume and ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import CacheWriter, Manifest, ShardRecord, plan_shards
from pipeline.cache.format import (
    IDS,
    TOPK_IDX,
    TOPK_VAL,
    SequenceIndex,
    array_specs,
    check_narrow,
    check_top_p,
    check_value_bits,
    row_bytes,
)
from pipeline.cache.storage import Storage
from pipeline.errors import ConfigError, DataError
from pipeline.hashing import plain
from pipeline.representations import host_arrays, represent, torch_buffer_dtype

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 8 << 20  # a chunk of the widest representation stays under this


class RowSource(Protocol):
    """What a task gives the engine: the teacher's outputs over a shard's rows."""

    unit: str  # what a row is, for the progress bar: "row", "tok"

    def logits(self, shard: ShardRecord) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, relative to the shard; (n, C) float32 logits on the device)`` pieces
        that together cover the shard's rows in order."""

    def ids(self, shard: ShardRecord) -> np.ndarray:
        """(shard.rows,) int64: the sample (or sequence) each row belongs to."""


def plan_manifest(cache, *, rows: int, num_classes: int, splits: dict[str, tuple[int, int]], fingerprint: dict,
                  index: SequenceIndex | None = None, task: dict | None = None) -> Manifest:
    """The manifest of a new cache from the cache section (``cache.*``): representations,
    dtype, layout. ``cache.chunk_rows`` is lowered so a chunk of the widest representation
    stays under 8 MiB (a `full` row of a 49,152-token vocabulary is 96 KiB). ``task``: the
    task's own manifest fields (:attr:`Manifest.task`)."""
    modes = sorted(plain(cache.modes))
    if "topk" in modes and cache.k > num_classes:
        raise ConfigError(f"cache.k={cache.k} is more than the teacher's {num_classes} outputs: lower cache.k")
    narrow = cache.narrow
    if narrow:
        check_narrow(num_classes, cache.samples if "sampled" in modes else 0, "cache")
    bits = check_value_bits(cache.value_bits, None, "cache")  # (ignored without topk)
    m = Manifest(backend=plain(cache.format), modes=modes, dtype=plain(cache.dtype), num_classes=num_classes, rows=rows,
                 chunk_rows=cache.chunk_rows, shard_rows=0, splits={k: list(v) for k, v in splits.items()},
                 fingerprint=fingerprint, k=cache.k if "topk" in modes else 0,
                 samples=cache.samples if "sampled" in modes else 0, temperatures=list(cache.temperatures),
                 sample_temperature=cache.sample_temperature, compression=plain(cache.zstd),
                 narrow=narrow, value_bits=bits if "topk" in modes else 16,
                 top_p=check_top_p(cache.top_p, modes, "cache"))
    if index is not None:
        index.describe(m)
    m.task = dict(task or {})
    widest = max(row_bytes(m, (mode,)) for mode in m.modes)
    m.chunk_rows = min(cache.chunk_rows, max(1, MAX_CHUNK_BYTES // max(widest, 1)))
    if m.chunk_rows < cache.chunk_rows:
        log.info("cache.chunk_rows %d -> %d to keep a chunk under %d MiB", cache.chunk_rows, m.chunk_rows,
                 MAX_CHUNK_BYTES >> 20)
    m.shard_rows = m.chunk_rows * cache.shard_chunks
    m.shards = plan_shards(rows, m.shard_rows)
    return m


def check_size(m: Manifest, max_full_gb: float) -> None:
    """Print the projected size of each representation; refuse a `full` capture above the limit."""
    sizes = {mode: m.rows * row_bytes(m, (mode,)) / 1e9 for mode in m.modes}
    log.info("projected cache size (uncompressed): %s",
             ", ".join(f"{k} {v:.3g} GB ({row_bytes(m, (k,))} B/row)" for k, v in sizes.items()))
    if sizes.get("full", 0.0) > max_full_gb:
        raise ConfigError(f"a `full` cache of {m.rows} rows x {m.num_classes} classes in {m.dtype} would take "
                         f"{sizes['full']:.1f} GB, above cache.max_full_gb={max_full_gb}: capture "
                         f"cache.modes=[topk] (K={m.k or 64}) or [sampled], or raise cache.max_full_gb")


def check_values(finite: torch.Tensor, peak: float, first_row: int, dtype: str) -> None:
    """Refuse non-finite rows (``finite``: one flag per row) and float16 overflow."""
    if not finite.all():
        rows = (torch.nonzero(~finite).flatten()[:10] + first_row).tolist()
        raise DataError(f"teacher produced non-finite logits at rows {rows}; refusing to cache them")
    if dtype == "float16" and peak > 65504:
        raise DataError(f"teacher logits reach {peak:.4g}, beyond float16's range; "
                         "use cache.dtype=bfloat16 or float32")


def row_health(logits: torch.Tensor, reps: dict[str, torch.Tensor], m: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, whether it may be cached, and the largest magnitude it stores. With `full`
    every logit is stored, so every logit is checked. Otherwise the stored float32 outputs
    are (a NaN or +inf logit makes a row's logsumexp or entropy non-finite; a 49,152-wide
    row is not swept again for this), and a float16 overflow shows as inf in the stored values."""
    if "full" in m.modes:
        return torch.isfinite(logits).all(dim=1), logits.abs().amax()
    f32 = [v.reshape(len(v), -1) for v in reps.values() if v.dtype == torch.float32]
    ok = torch.stack([torch.isfinite(v).all(dim=1) for v in f32]).all(dim=0)
    f16 = [(v.float().abs().masked_fill(reps[TOPK_IDX] < 0, 0) if name == TOPK_VAL else v.float().abs()).amax()
           for name, v in reps.items() if v.dtype == torch.float16 and v.numel()]  # (not an adaptive row's padding)
    return ok, (torch.stack(f16).amax() if f16 else torch.zeros((), device=ok.device)).nan_to_num(float("inf"))


def host_buffers(m: Manifest, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Host buffers for one shard, pinned when the teacher runs on CUDA (non-blocking copies)."""
    pin = device.type == "cuda"
    return {name: torch.empty((rows, *shape), dtype=torch_buffer_dtype(name, dt), pin_memory=pin)
            for name, (shape, dt) in array_specs(m).items() if name != IDS}


def capture_shard(source: RowSource, shard: ShardRecord, m: Manifest, device: torch.device,
                  bar=None) -> dict[str, np.ndarray]:
    """Every array of one shard, its representations computed on the device."""
    buffers = host_buffers(m, shard.rows, device)
    gen = torch.Generator(device=device).manual_seed(shard.index)  # resumable sampling: seeded per shard
    finite = torch.empty(shard.rows, dtype=torch.bool, device=device)
    peak = torch.zeros((), device=device)
    for d0, logits in source.logits(shard):
        if logits.ndim != 2 or logits.shape[1] != m.num_classes:
            raise ConfigError(f"teacher output has shape {tuple(logits.shape)}; expected (rows, {m.num_classes}): "
                             "the cache's width (data.num_classes for a classifier) must be the teacher's")
        d1 = d0 + len(logits)
        reps = represent(logits, m, gen)  # non-finite rows are refused below, before the writer sees them
        ok, top = row_health(logits, reps, m)
        finite[d0:d1] = ok  # checked once per shard: no device sync per batch
        peak = torch.maximum(peak, top)
        for name, values in reps.items():
            buffers[name][d0:d1].copy_(values, non_blocking=True)
        if bar is not None:
            bar.update(d1 - d0)
    check_values(finite.cpu(), peak.item(), shard.start, m.dtype)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the non-blocking copies have landed
    arrays = host_arrays(buffers, m)
    arrays[IDS] = np.asarray(source.ids(shard), dtype=np.int64)
    return arrays


@torch.inference_mode()
def capture(source: RowSource, m: Manifest, storage: Storage, *, device: torch.device, max_full_gb: float,
            zstd_level: int = 3, rank: int = 0, world_size: int = 1, index: SequenceIndex | None = None,
            overwrite: bool = False, verify: bool = False) -> Manifest:
    """Write the teacher's outputs over every row of ``m`` to ``storage``; resume if started."""
    check_size(m, max_full_gb)
    t0 = time.perf_counter()
    with CacheWriter(storage=storage, manifest=m, zstd_level=zstd_level, rank=rank, world_size=world_size,
                     index=index, overwrite=overwrite, verify=verify) as writer:
        todo = writer.pending()
        log.info("capture: rank %d of %d writes %d shard(s) to %s", rank, world_size, len(todo), storage.url)
        desc = "stage 1: teacher" if world_size == 1 else f"stage 1: teacher (rank {rank}/{world_size})"
        with tqdm(total=sum(s.rows for s in todo), desc=desc, unit=source.unit, unit_scale=True) as bar:
            for shard in writer.claim():
                writer.submit(shard, capture_shard(source, shard, writer.manifest, device, bar))
    state = "complete" if writer.manifest.complete else "waiting for other workers' shards"
    log.info("rank %d wrote %d shard(s) in %.1fs; cache %s (%d rows, modes %s, %s) is %s", rank, len(writer.written),
             time.perf_counter() - t0, storage.url, m.rows, m.modes, m.dtype, state)
    return writer.manifest
