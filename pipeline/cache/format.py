"""The on-disk cache format: array names, the manifest schema and its version.

A cache is a directory holding ``manifest.json`` and the arrays. The manifest is the
index: it lists every shard with its row range, status and checksum, and says
``complete: true`` only after the last shard is committed, so an interrupted capture
is visibly incomplete. It is always replaced atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids"
LOGITS = "logits"
MODES = ("full",)
DTYPES = ("float16", "bfloat16", "float32")
# bfloat16 has no NumPy dtype: it is stored as its raw uint16 bit pattern.
STORAGE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


@dataclass
class ShardRecord:
    index: int
    start: int
    stop: int
    status: str = "pending"  # pending | committed
    sha256: str | None = None

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Manifest:
    backend: str
    modes: list[str]
    dtype: str
    num_classes: int
    rows: int
    chunk_rows: int
    shard_rows: int
    splits: dict[str, list[int]]  # split name -> [start, stop) row range
    fingerprint: dict
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION
    info: dict = field(default_factory=dict)  # free-form: teacher accuracy, timings

    def missing_shards(self) -> list[int]:
        return [s.index for s in self.shards if s.status != "committed"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["shards"] = [ShardRecord(**s) for s in d.get("shards", [])]
        return cls(**d)


def plan_shards(rows: int, shard_rows: int) -> list[ShardRecord]:
    return [ShardRecord(i, start, min(start + shard_rows, rows))
            for i, start in enumerate(range(0, rows, shard_rows))]


def manifest_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, MANIFEST)


def write_manifest(cache_dir: str, manifest: Manifest) -> None:
    path = manifest_path(cache_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(cache_dir: str) -> Manifest:
    path = manifest_path(cache_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cache at {cache_dir!r}: {MANIFEST} is missing "
                                "(run stage 1 first, or point cache.path at an existing cache)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the cache index is damaged: re-run stage 1") from e
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"cache {cache_dir!r} has format_version={version!r}; this code reads "
                         f"version {FORMAT_VERSION}: re-capture it with this version of stage 1")
    try:
        return Manifest.from_dict(raw)
    except TypeError as e:
        raise ValueError(f"{path} does not match the manifest schema of version {FORMAT_VERSION}: {e}") from e
