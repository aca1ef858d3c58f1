"""Cache fingerprints: what a cache was made from, and the folder it lives in.

The fingerprint hashes the teacher's weights (state_dict, sorted keys, raw bytes), the
teacher config, the dataset *content* (the rows actually read), the capture settings
and the format version. Readers compare the fields they can know with what they find
and refuse a mismatch, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch

from pipeline.cache.format import FORMAT_VERSION
from pipeline.config import Config


def hash_state_dict(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_identity(cfg: Config) -> dict:
    """Teacher settings that change its logits (not device or batch size)."""
    t = asdict(cfg.teacher)
    return {k: t[k] for k in ("name", "_target_", "kwargs", "checkpoint", "channels", "fit")}


def capture_settings(cfg: Config, num_classes: int) -> dict:
    c = cfg.cache
    modes = sorted(m.value for m in c.modes)
    out = {"modes": modes, "dtype": c.dtype.value, "num_classes": num_classes,
           "precision": cfg.teacher.precision.value}
    if "topk" in modes:
        out |= {"k": c.k, "temperatures": list(c.temperatures)}
    if "sampled" in modes:
        out |= {"samples": c.samples, "sample_temperature": c.sample_temperature}
    return out


def expected_fields(cfg: Config, dataset_hash: str) -> dict:
    """The fingerprint fields a reader can know from its config and data alone."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_hash,
        "teacher_config": hash_json(teacher_identity(cfg)),
        "capture": capture_settings(cfg, cfg.data.num_classes),
    }


def make_fingerprint(fields: dict) -> dict:
    return {"digest": hash_json(fields), "fields": fields}


def check_fingerprint(found: dict, expected: dict, where: str) -> None:
    """Raise naming every field whose value differs."""
    have = found.get("fields", {})
    diffs = [f"{k}: expected {v!r}, found {have.get(k)!r}" for k, v in expected.items() if have.get(k) != v]
    if diffs:
        raise ValueError(f"cache {where!r} was made from something else than this run expects:\n  "
                         + "\n  ".join(diffs) + "\nre-run stage 1 with this config, or point cache.path "
                         "at the cache that matches")


def cache_key(cfg: Config) -> str:
    """Folder name of the cache: computed from the config alone, so stages 2 and 3
    find the cache without loading the teacher."""
    return key_from(cfg, {"teacher": teacher_identity(cfg), "data": asdict(cfg.data)})


def key_from(cfg: Config, ident: dict) -> str:
    """``<data>-<teacher>-<hash>`` of ``ident`` plus the capture settings and the layout."""
    ident = {**ident, "capture": capture_settings(cfg, cfg.data.num_classes), "version": FORMAT_VERSION,
             "layout": {"format": cfg.cache.format.value, "chunk_rows": cfg.cache.chunk_rows,
                        "shard_chunks": cfg.cache.shard_chunks, "zstd": cfg.cache.zstd.value}}
    return f"{cfg.data.name}-{cfg.teacher.name}-{hash_json(ident)[:12]}"


def cache_location(cfg: Config, root: str, key: str | None = None) -> str:
    """``cache.path`` when set, else ``<root>/caches/<key>`` (default :func:`cache_key`)."""
    return cfg.cache.path or os.path.join(root, "caches", key or cache_key(cfg))
