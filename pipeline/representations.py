"""Turning a batch of teacher logits into the cached representations, on the device.

``full`` keeps the logits; ``topk`` the K largest with their ids plus the exact
logsumexp of the whole row at each capture temperature; ``sampled`` draws S class ids
from the teacher's distribution at the sample temperature (RS-KD, Anshumann et al.,
2025) and keeps the distinct ids with their counts, plus the teacher's entropy.

The sampled estimator: with ``c_j`` draws of class j out of S, ``p_hat_j = c_j / S`` has
``E[p_hat_j] = p_j`` exactly, so ``-sum_j p_hat_j log q_j`` is an unbiased estimate of
the cross-entropy ``-sum_j p_j log q_j`` and ``q - p_hat`` of its gradient with respect
to the student's logits (over all C classes, the student's full softmax). Adding the
cached entropy, ``sum_j p_hat_j (-log q_j) - H(p)`` is an unbiased estimate of
``KL(p || q)``. Top-k targets are biased (the tail's mass is known, its shape is not);
sampled targets are not, at the price of variance.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.format import (
    LOGITS,
    LSE,
    SAMPLED_CNT,
    SAMPLED_ENT,
    SAMPLED_IDX,
    TOP1,
    TOPK_IDX,
    TOPK_Q,
    TOPK_VAL,
    Manifest,
    array_specs,
)

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def stored(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Cast to the cache dtype; bfloat16 as its raw bits (stored as uint16)."""
    out = values.to(_TORCH_DTYPE[dtype])
    return out.view(torch.int16) if dtype == "bfloat16" else out


_BUFFER_DTYPE = {"int64": torch.int64, "int32": torch.int32, "uint16": torch.int16, "uint8": torch.uint8,
                 "float16": torch.float16, "float32": torch.float32}


def torch_buffer_dtype(name: str, storage_dtype: str) -> torch.dtype:
    """The torch dtype that holds an array before it is stored: ids and counts as int32
    (stored int32 / uint16 / uint8), floats as themselves (a uint16 float is bfloat16 bits)."""
    return torch.int32 if name in (SAMPLED_CNT, SAMPLED_IDX, TOPK_IDX, TOP1) else _BUFFER_DTYPE[storage_dtype]


def host_arrays(tensors: dict[str, torch.Tensor], m: Manifest) -> dict[str, np.ndarray]:
    """CPU tensors from :func:`represent` as NumPy arrays in their storage dtypes."""
    out = {}
    for name, (_, dt) in array_specs(m).items():
        if name in tensors:
            a = tensors[name].numpy()
            out[name] = a.view(np.uint16) if a.dtype == np.int16 else a.astype(dt, copy=False)
    return out


def topk_arrays(idx: torch.Tensor, val: torch.Tensor, lse: torch.Tensor, m: Manifest) -> dict[str, torch.Tensor]:
    """The stored top-k arrays from (B, K) ids and logits, largest first, and (B, M) logsumexps
    at ``m.temperatures``: rows cut at ``m.top_p`` (adaptive, :func:`cut_topk`), the values
    in the cache dtype or quantized codes with each row's (largest, step) (``m.value_bits`` 8 or 4)."""
    if m.top_p:
        idx, val = cut_topk(idx, val, lse[:, 0], m.temperatures[0], m.top_p)
    out = {TOPK_IDX: idx.int(), LSE: lse}
    if m.value_bits < 16:
        codes, params = quantize_topk(val, m.value_bits)
        return out | {TOPK_VAL: codes, TOPK_Q: params}
    return out | {TOPK_VAL: stored(val, m.dtype)}


def cut_topk(idx: torch.Tensor, val: torch.Tensor, lse: torch.Tensor, temperature: float,
             top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive top-k: each (B, K) row, largest first, keeps its smallest prefix whose
    probability at ``temperature`` (from the row's exact logsumexp ``lse``, (B,)) reaches
    ``top_p`` (at least one entry, at most K); the entries after it become padding, id -1
    and value -inf. Where the teacher is sure, a row keeps one or two ids; the tail bucket
    (1 - the kept mass, exact from the logsumexp) holds the rest."""
    p = torch.exp(val.float() / temperature - lse.float().unsqueeze(-1))
    before = torch.cumsum(p, dim=1) - p  # mass of the entries before each one
    cut = (before >= top_p) | (idx < 0)
    cut[:, 0] = False
    return idx.masked_fill(cut, -1), val.masked_fill(cut, float("-inf"))


def map_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Class ids through a lookup ``table`` (teacher id -> student id, -1: none); the -1
    padding stays -1."""
    return np.where(ids >= 0, table[np.clip(ids, 0, None).astype(np.int64)], -1)


def pad_entries(idx: np.ndarray, val: np.ndarray, dropped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-K entries with probability 0 as padding: id -1, value -inf (what an adaptive
    row's unused entries hold; every top-k loss skips them, their mass is in the tail)."""
    return np.where(dropped, -1, idx).astype(np.int32), np.where(dropped, -np.inf, val).astype(np.float32)


def quantize_topk(val: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) top-k logits, largest first, as ``bits``-bit codes below each row's largest:
    code = round((largest - value) / step), step = (largest - smallest finite) / (2**bits - 2),
    so a value reads back within step / 2 (the largest exactly); the top code stands for
    -inf. At 4 bits two codes share a byte (even entries in the low half). Returns (codes
    uint8, (B, 2) float32 [largest, step])."""
    top = (1 << bits) - 1
    x = val.float()
    finite = torch.isfinite(x)
    largest = x[:, 0]
    smallest = torch.where(finite, x, largest[:, None]).amin(dim=1)
    span = largest - smallest
    step = torch.where(span > 0, span / (top - 1), torch.ones_like(span))
    codes = torch.round((largest[:, None] - x) / step[:, None]).clamp(0, top - 1)
    codes = torch.where(finite, codes, torch.full_like(codes, top)).to(torch.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, torch.stack([largest, step], dim=1)


def sorted_uniforms(rows: int, samples: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, samples) float64 uniforms in [0, 1), each row sorted: the draws' quantiles."""
    u = torch.rand((rows, samples), generator=generator, dtype=torch.float64, device=device)
    return u.sort(dim=1).values


def sample_counts(logits: torch.Tensor, samples: int, temperature: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``samples`` ids per row from softmax(logits/T); return the distinct ids
    (B, S) int32 padded with -1 and their counts (B, S) int32, zeros at the padding."""
    return counts_from_probs(torch.softmax(logits.float() / temperature, dim=-1), samples, generator)


def counts_from_probs(probs: torch.Tensor, samples: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse CDF of each row of ``probs`` at ``samples`` sorted uniforms (what the
    fused CPU pass does too): ids ascending, distinct ones with their counts."""
    cdf = torch.cumsum(probs.double(), dim=1)
    u = sorted_uniforms(len(probs), samples, generator, probs.device)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)  # (B, S), sorted
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.long().cumsum(dim=1) - 1  # (B, S): the distinct-id slot of each draw
    out_ids = torch.full_like(ids, -1).scatter_(1, slot, ids)
    counts = torch.zeros_like(ids).scatter_add_(1, slot, torch.ones_like(ids))
    return out_ids.int(), counts.int()


def represent(logits: torch.Tensor, m: Manifest, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """All arrays of the manifest's modes for a (B, C) batch of logits, on its device: on
    CPU by the fused Numba row pass (:mod:`pipeline.kernels.teacher_rows`: each row read
    once for all of it), elsewhere by :func:`represent_torch`. Rows holding NaN or +inf
    give a non-finite logsumexp or entropy, which the caller refuses."""
    if logits.device.type != "cpu":
        return represent_torch(logits, m, generator)
    from pipeline.kernels import summarize_rows

    out: dict[str, torch.Tensor] = {}
    if "full" in m.modes:
        out[LOGITS] = stored(logits, m.dtype)
    if not {"topk", "sampled"} & set(m.modes):  # (top1 comes with sampled-only caches)
        return out
    topk, sampled = "topk" in m.modes, "sampled" in m.modes
    u = sorted_uniforms(len(logits), m.samples, generator).numpy() if sampled else None
    rows = (stored(logits, "bfloat16").numpy().view(np.uint16) if logits.dtype == torch.bfloat16
            else logits.float().numpy())  # bfloat16 is read as its bits, no float32 copy
    r = {n: torch.from_numpy(a) for n, a in summarize_rows(
        rows, m.k if topk else 0, m.temperatures if topk else [],
        m.sample_temperature if sampled else None, u).items()}
    if topk:
        out |= topk_arrays(r["top_idx"], r["top_val"], r["lse"], m)
    if sampled:
        out |= {SAMPLED_IDX: r["s_idx"], SAMPLED_CNT: r["s_cnt"], SAMPLED_ENT: r["ent"]}
    if TOP1 in array_specs(m):
        out[TOP1] = r["top1"]
    return out


def represent_torch(logits: torch.Tensor, m: Manifest, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """:func:`represent` in torch ops (the CUDA path, and the CPU reference in the tests).

    Each logsumexp is computed once and shared: the sampling distribution is
    ``exp(z - lse)`` and the entropy ``lse - E_p[z]`` (z = logits / T), so a 49,152-wide
    vocabulary is swept a few times per row, not a dozen. Rows holding NaN or +inf are
    sampled from a placeholder so that the sampler never sees them."""
    out: dict[str, torch.Tensor] = {}
    x = logits.float()
    lse: dict[float, torch.Tensor] = {}

    def scaled(t: float) -> torch.Tensor:
        return x if t == 1.0 else x / t

    def lse_at(t: float) -> torch.Tensor:
        if t not in lse:
            lse[t] = torch.logsumexp(scaled(t), dim=-1)
        return lse[t]

    if "full" in m.modes:
        out[LOGITS] = stored(logits, m.dtype)
    if "topk" in m.modes:
        val, idx = torch.topk(x, m.k, dim=-1)  # (B, K), sorted, largest first
        out |= topk_arrays(idx, val, torch.stack([lse_at(t) for t in m.temperatures], dim=1), m)
    if "sampled" in m.modes:
        z, zl = scaled(m.sample_temperature), lse_at(m.sample_temperature)
        p = torch.exp(z - zl.unsqueeze(-1))
        if not bool(torch.isfinite(zl).all()):  # rare: the caller refuses these rows
            p = p.nan_to_num(1.0, 1.0, 0.0)
        ids, counts = counts_from_probs(p, m.samples, generator)
        out[SAMPLED_IDX] = ids
        out[SAMPLED_CNT] = counts.to(torch.int32)
        # H(p) = lse(z) - E_p[z] (0 * -inf terms are 0); the difference can round a hair below 0
        out[SAMPLED_ENT] = torch.maximum(zl - torch.nansum(p * z, -1), torch.zeros_like(zl))
    if TOP1 in array_specs(m):  # sampled-only: the argmax, so teacher accuracy is exact, not a guess
        out[TOP1] = x.argmax(dim=-1).int()
    return out


def topk_distribution(topk_val: torch.Tensor, lse: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities at T of the K cached classes, (B, K), and the tail's total
    mass, (B,), from top-k logits and the exact logsumexp of the whole row at T."""
    probs = torch.exp(topk_val.float() / temperature - lse.unsqueeze(-1))
    return probs, (1.0 - probs.sum(-1)).clamp_min(0.0)
