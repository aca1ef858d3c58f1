"""Deriving a smaller cache from a full one, as a Dask job: ``full`` -> ``topk`` (K largest
logits + exact logsumexp at the capture temperatures), or ``full`` in another dtype
(float32 -> float16). Each parent shard becomes one child shard, computed by the same
:func:`pipeline.representations.represent` that stage 1 uses, written by the same
crash-safe writer (so a derive is resumable too). The child's manifest records its
parent's path and fingerprint.

Fidelity: the mean KL(p || p_derived) at the loss temperature over a held-out slice (the
test split), where a top-k row is completed by spreading its known tail mass evenly over
the other C - K classes; storage ratio: the child's bytes over the parent's.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import dask
import numpy as np
import torch

from pipeline.cache import (
    CacheReader,
    CacheWriter,
    Manifest,
    Storage,
    make_fingerprint,
    open_cache,
    plan_shards,
)
from pipeline.cache.format import IDS, LOGITS, NARROW_PAD, SequenceIndex
from pipeline.representations import host_arrays, represent

log = logging.getLogger(__name__)


def child_manifest(parent: Manifest, mode: str, k: int, dtype: str, temperatures: list[float], path: str,
                   narrow: bool = False, value_bits: int = 16) -> Manifest:
    if "full" not in parent.modes:
        raise ValueError(f"derive needs a cache with full logits; this one holds {parent.modes}")
    if mode == "topk" and not 0 < k <= parent.num_classes:
        raise ValueError(f"derive.k={k}: must be in 1..{parent.num_classes} (the cache's classes)")
    fields = dict(parent.fingerprint["fields"])
    capture = {"modes": [mode], "dtype": dtype, "num_classes": parent.num_classes,
               "derived_from": parent.fingerprint["digest"]}
    if mode == "topk":
        capture |= {"k": k, "temperatures": list(temperatures)}
        if value_bits < 16:
            capture["value_bits"] = value_bits
    if value_bits not in (16, 8, 4) or (value_bits < 16 and mode != "topk"):
        raise ValueError(f"derive.value_bits={value_bits}: 16, or 8 / 4 for a topk derive")
    fields["capture"] = capture
    if narrow and parent.num_classes > NARROW_PAD:
        raise ValueError(f"derive.narrow=true stores class ids as uint16, which holds {NARROW_PAD} classes; the "
                         f"cache has {parent.num_classes}: set derive.narrow=false")
    return replace(parent, modes=[mode], dtype=dtype, k=k if mode == "topk" else 0, samples=0, narrow=narrow,
                   value_bits=value_bits,
                   temperatures=list(temperatures), shards=plan_shards(parent.rows, parent.shard_rows),
                   complete=False, fingerprint=make_fingerprint(fields),
                   info={"parent": {"path": path, "fingerprint": parent.fingerprint["digest"]}})


def _derive_shard(ids: np.ndarray, logits: np.ndarray, child: Manifest) -> dict[str, np.ndarray]:
    arrays = host_arrays(represent(torch.from_numpy(np.asarray(logits, np.float32)), child), child)
    arrays[IDS] = ids
    return arrays


def derive_cache(reader: CacheReader, child: Manifest, target: str, *, storage_options: dict | None = None,
                 scheduler=None, in_flight: int = 4, overwrite: bool = False, verify: bool = False) -> Manifest:
    """Write ``child`` at ``target`` from ``reader``'s full logits, ``in_flight`` shards at a time."""
    ids, logits = reader.ids, reader.logits
    index = None
    if child.sequences:  # a token cache's, its tokenizer with it
        text = reader.tokenizer_json
        index = SequenceIndex(reader.offsets, reader.positions, text.encode() if text is not None else None)
    with CacheWriter(storage=Storage(target, storage_options), manifest=child, overwrite=overwrite,
                     verify=verify, index=index) as writer:
        # batches of shards nobody else holds (claims held while computing: never wait then),
        # then, one at a time, those another process was writing (waiting holds no claim)
        claimed = writer.claim(wait=False)
        while batch := list(itertools.islice(claimed, in_flight)):
            jobs = [dask.delayed(_derive_shard)(ids[s.start:s.stop], logits[s.start:s.stop], child) for s in batch]
            for shard, arrays in zip(batch, dask.compute(*jobs, scheduler=scheduler), strict=True):
                writer.submit(shard, arrays)
        for shard in writer.claim():
            (arrays,) = dask.compute(dask.delayed(_derive_shard)(ids[shard.start:shard.stop],
                                                                 logits[shard.start:shard.stop], child),
                                     scheduler=scheduler)
            writer.submit(shard, arrays)
    return writer.manifest


def completed_topk(val: np.ndarray, idx: np.ndarray, lse: np.ndarray, c: int, temperature: float) -> np.ndarray:
    """The derived distribution (B, C): exact on the K classes, the tail mass spread evenly."""
    p_k = np.exp(val.astype(np.float64) / temperature - lse[:, None])
    tail = np.clip(1.0 - p_k.sum(1), 0.0, None)
    out = np.repeat((tail / max(c - idx.shape[1], 1))[:, None], c, axis=1)
    np.put_along_axis(out, idx.astype(np.int64), p_k, axis=1)
    return out


def fidelity(parent: CacheReader, child: CacheReader, rows: tuple[int, int], temperature: float) -> float:
    """Mean KL(p_full || p_derived) at ``temperature`` over ``rows``."""
    start, stop = rows
    z = parent.logits[start:stop].compute().astype(np.float64) / temperature
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    m = child.manifest
    if "topk" in m.modes:
        if temperature not in m.temperatures:
            raise ValueError(f"fidelity at T={temperature} needs the derived lse at T; it has {m.temperatures}")
        lse = child.arrays["lse"][start:stop, m.temperatures.index(temperature)].compute().astype(np.float64)
        q = completed_topk(child.arrays["topk_val"][start:stop].compute(), child.arrays["topk_idx"][start:stop]
                           .compute(), lse, m.num_classes, temperature)
    else:
        zq = child.arrays[LOGITS][start:stop].compute().astype(np.float64) / temperature
        q = np.exp(zq - zq.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
    p = np.exp(logp)
    kl = (p * (logp - np.log(np.maximum(q, 1e-300)))).sum(1)
    return float(kl.mean())


def disk_bytes(reader: CacheReader) -> int:
    fs = reader.storage.fs
    return int(sum(fs.size(p) for p in fs.find(reader.storage.root)))


def derive_report(parent: CacheReader, target: str, temperature: float, storage_options: dict | None = None) -> dict:
    child = open_cache(target, storage_options=storage_options)
    split = "test" if "test" in parent.manifest.splits else next(iter(parent.manifest.splits))
    rows = parent.split_range(split)
    return {"path": target, "modes": child.manifest.modes, "k": child.manifest.k, "dtype": child.manifest.dtype,
            "parent": child.manifest.info.get("parent"),
            "storage_ratio": disk_bytes(child) / disk_bytes(parent),
            "fidelity_kl": fidelity(parent, child, rows, temperature), "fidelity_split": split,
            "fidelity_temperature": temperature}


def derive_for_run(d, cache, temperature: float, reader: CacheReader, scheduler=None, verify: bool = False) -> dict:
    """Stage 2's ``derive.*`` settings (``d``) applied to ``reader``, written with the
    ``cache.*`` section's storage options; returns the report."""
    narrow, bits = bool(getattr(d, "narrow", False)), int(getattr(d, "value_bits", 16))
    target = d.path or (f"{reader.path.rstrip('/')}-{d.mode}{d.k if d.mode == 'topk' else ''}-{d.dtype.value}"
                        f"{f'-q{bits}' if bits < 16 else ''}{'-narrow' if narrow else ''}")
    temps = sorted({*cache.temperatures, temperature})
    child = child_manifest(reader.manifest, d.mode, d.k, d.dtype.value, temps, reader.path, narrow, bits)
    log.info("deriving %s (K=%d, %s) from %s into %s", d.mode, d.k, d.dtype.value, reader.path, target)
    derive_cache(reader, child, target, storage_options=cache.storage_options, scheduler=scheduler,
                 overwrite=cache.overwrite, verify=verify)
    return derive_report(reader, target, temperature, cache.storage_options)
