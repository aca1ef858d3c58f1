"""Deriving a smaller cache from a larger one, as a Dask job: ``full`` -> ``topk`` (K largest
logits + exact logsumexp at the capture temperatures), or ``full`` in another dtype
(float32 -> float16); without full logits, ``topk`` K -> a narrower ``topk``, and
``sampled`` S draws -> fewer (a uniform subset of each row's draws). Any of them can be
``narrow`` and a top-k quantized (``value_bits``). Each parent shard becomes one child shard, computed by the same
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
from pipeline.cache.format import (
    IDS,
    LOGITS,
    LSE,
    REPRESENTATIONS,
    SAMPLED_CNT,
    SAMPLED_ENT,
    SAMPLED_IDX,
    TASK_FILES,
    TOP1,
    TOPK_IDX,
    TOPK_VAL,
    SequenceIndex,
    array_specs,
    check_narrow,
    check_top_p,
    check_value_bits,
)
from pipeline.errors import CacheError, ConfigError
from pipeline.representations import host_arrays, represent, topk_arrays
from pipeline.stream import CacheRows

log = logging.getLogger(__name__)


def child_manifest(parent: Manifest, mode: str, k: int, dtype: str, temperatures: list[float], path: str,
                   narrow: bool = False, value_bits: int = 16, samples: int = 0, top_p: float = 0.0) -> Manifest:
    """The manifest of a cache derived from ``parent``: from full logits any ``topk`` (or
    ``full`` in another dtype); from a top-K cache a top-k with k <= K at temperatures it
    holds; from a sampled cache one with fewer draws."""
    source = derive_source(parent, mode, k, temperatures, samples)
    if mode == "topk" and not 0 < k <= parent.num_classes:
        raise ConfigError(f"derive.k={k}: must be in 1..{parent.num_classes} (the cache's classes)")
    fields = dict(parent.fingerprint["fields"])
    capture = {"modes": [mode], "dtype": dtype, "num_classes": parent.num_classes,
               "derived_from": parent.fingerprint["digest"]}
    if "precision" in fields.get("capture", {}):  # the teacher's: a reader with teacher.precision=auto adopts it
        capture["precision"] = fields["capture"]["precision"]
    if mode == "topk":
        capture |= {"k": k, "temperatures": list(temperatures)}
        if value_bits < 16:
            capture["value_bits"] = value_bits
        if top_p:
            capture["top_p"] = top_p
    if mode == "sampled":
        capture |= {"samples": samples, "sample_temperature": parent.sample_temperature}
    check_value_bits(value_bits, [mode], "derive")
    fields["capture"] = capture
    top_p = check_top_p(top_p, [mode], "derive")
    if narrow:
        check_narrow(parent.num_classes, samples if mode == "sampled" else 0, "derive")
    return replace(parent, modes=[mode], dtype=dtype, k=k if mode == "topk" else 0,
                   samples=samples if mode == "sampled" else 0, narrow=narrow, value_bits=value_bits, top_p=top_p,
                   temperatures=list(temperatures), shards=plan_shards(parent.rows, parent.shard_rows),
                   complete=False, fingerprint=make_fingerprint(fields),
                   info={"parent": {"path": path, "fingerprint": parent.fingerprint["digest"], "source": source}})


def derive_source(parent: Manifest, mode: str, k: int, temperatures: list[float], samples: int) -> str:
    """Which of the parent's representations a derive reads: ``full`` when it has it, else
    its ``topk`` (for a top-k as wide or narrower, at temperatures it holds) or its
    ``sampled`` rows (for fewer draws). Anything else is refused, saying what would do."""
    source = next((r for r in REPRESENTATIONS[mode].sources if r in parent.modes), None)
    if source == "topk":
        missing = sorted(set(temperatures) - set(parent.temperatures))
        if k > parent.k or missing:
            raise ConfigError(f"derive.k={k} at temperatures {sorted(temperatures)} from a top-{parent.k} cache with "
                             f"the logsumexp at {parent.temperatures}: a top-k derive keeps at most the parent's K "
                             "and its temperatures (set loss.temperature to one of them)")
    if source == "sampled" and not 0 < samples <= parent.samples:
        raise ConfigError(f"derive.samples={samples}: a sampled derive keeps a subset of the parent's "
                         f"{parent.samples} draws per row: choose 1..{parent.samples}")
    if source:
        return source
    raise ConfigError(f"derive.mode={mode} from a cache holding {parent.modes}: full logits derive top-k or another "
                     "dtype; a top-K cache derives a narrower top-k; a sampled cache derives fewer draws")


def subsample_draws(idx: np.ndarray, cnt: np.ndarray, samples: int, rng: np.random.Generator):
    """``samples`` of each row's draws, taken without replacement (a multivariate
    hypergeometric draw from its counts): a uniform subset of a multinomial sample is itself
    a multinomial sample, so the counts stay an unbiased estimate of p. Returns the distinct
    ids (-1 padding) and their counts."""
    n, s = cnt.shape
    total = cnt.sum(1)
    if (total != total[0]).any() or (len(total) and total[0] < samples):
        raise CacheError(f"sampled rows hold {sorted(set(total.tolist()))} draws; a subsample of {samples} "
                         "needs rows of equal draws, at least as many")
    draws = np.repeat(idx.astype(np.int64).ravel(), cnt.astype(np.int64).ravel()).reshape(n, -1)
    keep = np.argsort(rng.random(draws.shape), axis=1)[:, :samples]
    chosen = np.sort(np.take_along_axis(draws, keep, 1), axis=1)
    first = np.ones_like(chosen, dtype=bool)
    first[:, 1:] = chosen[:, 1:] != chosen[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    out_idx = np.full((n, samples), -1, np.int64)
    out_cnt = np.zeros((n, samples), np.int64)
    rows = np.repeat(np.arange(n), samples)
    out_idx[rows, slot.ravel()] = chosen.ravel()
    np.add.at(out_cnt, (rows, slot.ravel()), 1)
    return out_idx.astype(np.int32), out_cnt.astype(np.int32)


def _derive_shard(ids: np.ndarray, source: dict, child: Manifest, seed: int,
                  parent_temperatures: list[float]) -> dict[str, np.ndarray]:
    """One child shard from the parent's rows (``source``: its arrays for these rows; draws
    subsampled with a generator seeded by the shard index, so a resumed derive is the same)."""
    if LOGITS in source:
        tensors = represent(torch.from_numpy(np.asarray(source[LOGITS], np.float32)), child)
    elif child.modes == ["topk"]:  # the first k of the parent's top-K (sorted, largest first)
        k, temps = child.k, parent_temperatures
        tensors = topk_arrays(*(torch.from_numpy(np.ascontiguousarray(source[n][:, :k], dt))
                                for n, dt in ((TOPK_IDX, np.int32), (TOPK_VAL, np.float32))),
                              torch.from_numpy(np.ascontiguousarray(
                                  source[LSE][:, [temps.index(t) for t in child.temperatures]], np.float32)), child)
    else:  # fewer of the parent's draws
        sid, cnt = subsample_draws(source[SAMPLED_IDX], source[SAMPLED_CNT], child.samples,
                                   np.random.default_rng(seed))
        tensors = {SAMPLED_IDX: torch.from_numpy(sid), SAMPLED_CNT: torch.from_numpy(cnt),
                   SAMPLED_ENT: torch.from_numpy(np.asarray(source[SAMPLED_ENT], np.float32))}
        if TOP1 in array_specs(child):  # the exact argmax, from the parent
            top1 = source[TOP1] if TOP1 in source else source[TOPK_IDX][:, 0]
            tensors[TOP1] = torch.from_numpy(np.asarray(top1, np.int32))
    arrays = host_arrays(tensors, child)
    arrays[IDS] = ids
    return arrays


def derive_cache(reader: CacheReader, child: Manifest, target: str, *, storage_options: dict | None = None,
                 scheduler=None, in_flight: int = 4, overwrite: bool = False, verify: bool = False) -> Manifest:
    """Write ``child`` at ``target`` from ``reader``'s rows (its full logits, or the sparse
    representation :func:`derive_source` picks), ``in_flight`` shards at a time."""
    m = reader.manifest
    source = derive_source(m, child.modes[0], child.k, child.temperatures, child.samples)
    argmax = (TOP1,) if TOP1 in reader.arrays else (TOPK_IDX,) if TOPK_IDX in reader.arrays else ()
    names = REPRESENTATIONS[source].arrays + (argmax if source == "sampled" else ())
    arrays = {n: reader.arrays[n] for n in names}
    ids = reader.ids
    index = None
    if child.sequences:  # a token cache's, its tokenizer with it
        text = reader.tokenizer_json
        index = SequenceIndex(reader.offsets, reader.positions, text.encode() if text is not None else None)

    def job(shard):
        rows = slice(shard.start, shard.stop)
        return dask.delayed(_derive_shard)(ids[rows], {n: a[rows] for n, a in arrays.items()}, child, shard.index,
                                           list(m.temperatures))

    storage = Storage(target, storage_options)
    with CacheWriter(storage=storage, manifest=child, overwrite=overwrite, verify=verify, index=index) as writer:
        # batches of shards nobody else holds (claims held while computing: never wait then),
        # then, one at a time, those another process was writing (waiting holds no claim)
        claimed = writer.claim(wait=False)
        while batch := list(itertools.islice(claimed, in_flight)):
            for shard, out in zip(batch, dask.compute(*[job(s) for s in batch], scheduler=scheduler), strict=True):
                writer.submit(shard, out)
        for shard in writer.claim():
            (out,) = dask.compute(job(shard), scheduler=scheduler)
            writer.submit(shard, out)
    copy_task_files(reader.storage, storage)
    return writer.manifest


def copy_task_files(parent: Storage, child: Storage) -> None:
    """The capturing task's files (TASK_FILES) go with the derived cache, unread."""
    for rel in sorted(parent.listing(TASK_FILES)):
        if not Storage.temporary_of(rel):
            child.write_atomic(parent.read_bytes(rel), rel)


def completed_topk(val: np.ndarray, idx: np.ndarray, lse: np.ndarray, c: int, temperature: float) -> np.ndarray:
    """The derived distribution (B, C): exact on the cached classes (not the padding of an
    adaptive row), the tail mass spread evenly over the others."""
    held = idx >= 0
    with np.errstate(over="ignore"):
        p_k = np.where(held, np.exp(val.astype(np.float64) / temperature - lse[:, None]), 0.0)
    tail = np.clip(1.0 - p_k.sum(1), 0.0, None)
    out = np.repeat((tail / np.maximum(c - held.sum(1), 1))[:, None], c, axis=1)
    rows = np.broadcast_to(np.arange(len(idx))[:, None], idx.shape)
    out[rows[held], idx[held]] = p_k[held]
    return out


def fidelity(parent: CacheReader, child: CacheReader, rows: tuple[int, int], temperature: float) -> float:
    """Mean KL(p_full || p_derived) at ``temperature`` over ``rows``."""
    start, stop = rows
    z = CacheRows(parent, (LOGITS,)).read_rows(start, stop)[LOGITS].astype(np.float64) / temperature
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    m = child.manifest
    if "topk" in m.modes:
        if temperature not in m.temperatures:
            raise ValueError(f"fidelity at T={temperature} needs the derived lse at T; it has {m.temperatures}")
        got = CacheRows(child, (LSE, TOPK_VAL, TOPK_IDX)).read_rows(start, stop)
        lse = got[LSE][:, m.temperatures.index(temperature)].astype(np.float64)
        q = completed_topk(got[TOPK_VAL], got[TOPK_IDX], lse, m.num_classes, temperature)
    else:
        zq = CacheRows(child, (LOGITS,)).read_rows(start, stop)[LOGITS].astype(np.float64) / temperature
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
    return {"path": target, "modes": child.manifest.modes, "k": child.manifest.k, "samples": child.manifest.samples,
            "dtype": child.manifest.dtype,
            "parent": child.manifest.info.get("parent"),
            "storage_ratio": disk_bytes(child) / disk_bytes(parent),
            # against the full distribution, where the parent has it
            "fidelity_kl": fidelity(parent, child, rows, temperature) if LOGITS in parent.arrays else None,
            "fidelity_split": split,
            "fidelity_temperature": temperature}


def derive_for_run(d, cache, temperature: float, reader: CacheReader, scheduler=None, verify: bool = False) -> dict:
    """Stage 2's ``derive.*`` settings (``d``) applied to ``reader``, written with the
    ``cache.*`` section's storage options; returns the report."""
    mode, narrow, bits, samples, top_p = d.mode.value, d.narrow, d.value_bits, d.samples, d.top_p
    size = {"topk": d.k, "sampled": samples}.get(mode, "")
    target = d.path or (f"{reader.path.rstrip('/')}-{mode}{size}-{d.dtype.value}"
                        f"{f'-p{top_p:g}' if top_p else ''}{f'-q{bits}' if bits < 16 else ''}{'-narrow' if narrow else ''}")
    temps = sorted({*cache.temperatures, temperature})
    if "full" not in reader.manifest.modes and mode == "topk":
        temps = sorted({temperature} & set(reader.manifest.temperatures)) or [temperature]
    child = child_manifest(reader.manifest, mode, d.k, d.dtype.value, temps, reader.path, narrow, bits, samples,
                           top_p)
    log.info("deriving %s (K=%d, %s) from %s into %s", mode, d.k, d.dtype.value, reader.path, target)
    derive_cache(reader, child, target, storage_options=cache.storage_options, scheduler=scheduler,
                 overwrite=cache.overwrite, verify=verify)
    return derive_report(reader, target, temperature, cache.storage_options)
