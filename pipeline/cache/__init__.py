"""The teacher-logit cache: format (manifest, version), fingerprint, storage, backends,
writer, reader. Knows nothing of the run's config: callers pass the values."""

from pipeline.cache.fingerprint import (
           cache_key,
           cache_location,
           fingerprint_fields,
           make_fingerprint,
)
from pipeline.cache.format import FORMAT_VERSION, Manifest, ShardRecord, plan_shards, read_manifest
from pipeline.cache.reader import CacheReader, open_cache
from pipeline.cache.storage import Storage
from pipeline.cache.writer import CacheWriter

__all__ = ["FORMAT_VERSION", "CacheReader", "CacheWriter", "Manifest", "ShardRecord", "Storage", "cache_key",
           "cache_location", "fingerprint_fields", "make_fingerprint", "open_cache", "plan_shards", "read_manifest"]
