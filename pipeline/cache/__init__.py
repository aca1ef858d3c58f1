"""The teacher-logit cache: format (manifest, version), fingerprint, storage, backends,
writer, reader. Knows nothing of the run's config: callers pass the values.

The names below are imported when first asked for, so ``pipeline.cache.format`` (the
array names and representations the config is built from) loads without Dask or Zarr."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {"cache_key": "fingerprint", "cache_location": "fingerprint", "fingerprint_fields": "fingerprint",
          "make_fingerprint": "fingerprint", "FORMAT_VERSION": "format", "Manifest": "format",
          "ShardRecord": "format", "plan_shards": "format", "read_manifest": "format", "CacheReader": "reader",
          "open_cache": "reader", "Storage": "storage", "CacheWriter": "writer"}

if TYPE_CHECKING:
    from pipeline.cache.fingerprint import (
        cache_key,
        cache_location,
        fingerprint_fields,
        make_fingerprint,
    )
    from pipeline.cache.format import (
        FORMAT_VERSION,
        Manifest,
        ShardRecord,
        plan_shards,
        read_manifest,
    )
    from pipeline.cache.reader import CacheReader, open_cache
    from pipeline.cache.storage import Storage
    from pipeline.cache.writer import CacheWriter


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pipeline.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.cache.{_HOMES[name]}"), name)


__all__ = ["FORMAT_VERSION", "CacheReader", "CacheWriter", "Manifest", "ShardRecord", "Storage", "cache_key",
           "cache_location", "fingerprint_fields", "make_fingerprint", "open_cache", "plan_shards", "read_manifest"]
