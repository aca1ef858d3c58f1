"""Cache fingerprints: what a cache was made from, and the folder it lives in.

One schema for every task. A fingerprint's ``fields`` are:

- ``format_version``: :data:`pipeline.cache.format.FORMAT_VERSION`;
- ``dataset``: the hash of the rows actually read (samples, or token sequences);
- ``teacher``: the hash of what changes the teacher's outputs and can be known without
  loading it (its config and checkpoint path, or the hash of its weight files and
  tokenizer), so stages 2 and 3 check it without the model;
- ``capture``: the representations and their settings (:func:`capture_settings`);
- ``teacher_weights`` (recorded when the teacher was loaded, never required by a reader):
  the hash of its state_dict.

Readers compare the fields they can know with what they find and refuse a mismatch,
naming the field. Nothing here reads the run's config: callers pass the values.
"""

from __future__ import annotations

import os

from pipeline.cache.format import FORMAT_VERSION
from pipeline.errors import CacheError
from pipeline.hashing import hash_json, plain


def capture_settings(cache, precision: str) -> dict:
    """The capture settings that change a cache's content, from a cache section (anything
    with ``modes``, ``dtype``, ``k``, ``temperatures``, ``samples``, ``sample_temperature``)."""
    modes = sorted(plain(m) for m in cache.modes)
    out = {"modes": modes, "dtype": plain(cache.dtype), "precision": plain(precision)}
    if "topk" in modes:
        out |= {"k": cache.k, "temperatures": list(cache.temperatures)}
        if cache.value_bits < 16:  # named only when quantized: other caches keep their keys
            out["value_bits"] = cache.value_bits
        if cache.top_p:  # adaptive rows, likewise named only when on
            out["top_p"] = float(cache.top_p)
    if "sampled" in modes:
        out |= {"samples": cache.samples, "sample_temperature": cache.sample_temperature}
    return out


def layout_settings(cache) -> dict:
    """How a cache is stored (not what it holds): part of its folder's key."""
    out = {"format": plain(cache.format), "chunk_rows": cache.chunk_rows, "shard_chunks": cache.shard_chunks,
           "zstd": plain(cache.zstd)}
    if cache.narrow:  # named only when on: the folders of other caches keep their keys
        out["narrow"] = True
    return out


def fingerprint_fields(*, dataset: str, teacher: dict, capture: dict) -> dict:
    """The fields every reader can know from its config and data alone."""
    return {"format_version": FORMAT_VERSION, "dataset": dataset, "teacher": hash_json(teacher), "capture": capture}


def make_fingerprint(fields: dict) -> dict:
    return {"digest": hash_json(fields), "fields": fields}


def check_fingerprint(found: dict, expected: dict, where: str) -> None:
    """Raise naming every field whose value differs. A derived cache (stage 2's derive) holds
    its own representation, whatever the run's ``cache.*`` says: its capture settings are not
    compared, its data and teacher (its parent's) are."""
    have = found.get("fields", {})
    if "derived_from" in have.get("capture", {}):
        expected = {k: v for k, v in expected.items() if k != "capture"}
    diffs = [f"{k}: expected {v!r}, found {have.get(k)!r}" for k, v in expected.items() if have.get(k) != v]
    if diffs:
        raise CacheError(f"cache {where!r} was made from something else than this run expects:\n  "
                         + "\n  ".join(diffs) + "\nre-run stage 1 with this config, or point cache.path "
                         "at the cache that matches")


def cache_key(data_name: str, teacher_name: str, ident: dict) -> str:
    """``<data>-<teacher>-<hash>``: the folder name of a cache, from ``ident`` (what the
    fingerprint holds plus the layout), known without loading the teacher."""
    return f"{data_name}-{teacher_name}-{hash_json({**ident, 'version': FORMAT_VERSION})[:12]}"


def cache_location(path: str | None, root: str, key: str) -> str:
    """``path`` (``cache.path``) when set, else ``<root>/caches/<key>``."""
    return path or os.path.join(root, "caches", key)
