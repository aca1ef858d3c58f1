"""How readers see a cache's stored arrays: the one decoding, for the Dask arrays of
:func:`pipeline.cache.open_cache` and the batches of the streams alike.

Three arrays are stored otherwise than readers see them: bfloat16 values as their uint16
bit patterns (decoded to float32), quantized top-k values as codes beside each row's
(largest, step) (decoded to float32 values), and a narrow cache's uint16 ids and uint8
counts (widened to int32 ids, -1 padding, and uint16 counts). :func:`decoders` says which,
for a manifest; each decoder is a NumPy function of a block of rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.cache.format import (
    LOGITS,
    NARROW_PAD,
    SAMPLED_CNT,
    SAMPLED_IDX,
    TOP1,
    TOPK_IDX,
    TOPK_Q,
    TOPK_VAL,
    Manifest,
    array_specs,
)


@dataclass(frozen=True)
class Decoder:
    """``fn(stored, *extras)``: a block of the stored array (and the same rows of the
    arrays named in ``extras``) as readers see it, ``dtype`` rows ``width`` wide (None: as
    stored)."""

    fn: Callable[..., np.ndarray]
    dtype: str
    extras: tuple[str, ...] = ()
    width: int | None = None


def decoders(m: Manifest) -> dict[str, Decoder]:
    """The arrays of ``m`` that readers see otherwise than stored, each with its decoder."""
    out = {name: Decoder(bf16_bits_to_float32, "float32") for name in bf16_arrays(m)}
    if quantized(m):
        out[TOPK_VAL] = Decoder(functools.partial(dequantize, bits=m.value_bits, k=m.k), "float32", (TOPK_Q,), m.k)
    if m.narrow:
        for name in (TOPK_IDX, SAMPLED_IDX, SAMPLED_CNT, TOP1):
            out[name] = Decoder(functools.partial(widen, name), "uint16" if name == SAMPLED_CNT else "int32")
    stored = array_specs(m)
    return {name: d for name, d in out.items() if name in stored}


def bf16_arrays(m: Manifest) -> set[str]:
    """The arrays stored as bfloat16 bits (not top-k values quantized to codes)."""
    if m.dtype != "bfloat16":
        return set()
    return {LOGITS, TOPK_VAL} & set(array_specs(m)) - ({TOPK_VAL} if quantized(m) else set())


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantized(m: Manifest) -> bool:
    """Whether ``topk_val`` holds quantized codes (``value_bits`` 8 or 4)."""
    return "topk" in m.modes and m.value_bits < 16


def dequantize(codes, params, bits: int, k: int) -> np.ndarray:
    """(N, K) float32 top-k values from their codes and each row's (largest, step): value =
    largest - code * step; the top code (2**bits - 1) stands for -inf."""
    codes = np.asarray(codes)
    if bits == 4:
        both = np.empty((len(codes), 2 * codes.shape[1]), np.uint8)
        both[:, 0::2], both[:, 1::2] = codes & 15, codes >> 4
        codes = both[:, :k]
    params = np.asarray(params, np.float32)
    out = params[:, :1] - codes.astype(np.float32) * params[:, 1:2]
    out[codes == (1 << bits) - 1] = -np.inf
    return out


def widen(name: str, a) -> np.ndarray:
    """A narrow array as readers see it: ids int32 (NARROW_PAD back to -1), counts uint16."""
    if name == SAMPLED_CNT:
        return a.astype(np.uint16)
    out = a.astype(np.int32)
    if name in (SAMPLED_IDX, TOPK_IDX):
        out[out == NARROW_PAD] = -1
    return out


def decode_rows(arrays: dict[str, np.ndarray], codecs: dict[str, Decoder]) -> dict[str, np.ndarray]:
    """``arrays`` (blocks of the same rows) with each array in ``codecs`` decoded, in place."""
    stored = {n: arrays[n] for e in codecs.values() for n in e.extras}  # as stored, whatever is decoded first
    for name, d in codecs.items():
        arrays[name] = d.fn(arrays[name], *(stored[e] for e in d.extras))
    return arrays


__all__ = ["Decoder", "bf16_arrays", "bf16_bits_to_float32", "decode_rows", "decoders", "dequantize", "quantized",
           "widen"]
