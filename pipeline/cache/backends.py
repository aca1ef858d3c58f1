"""The two storage backends behind one interface: ``create``, ``write_shard``,
``read_shard`` and ``dask_arrays``, each taking a Storage and the Manifest."""

from __future__ import annotations

from types import ModuleType

from pipeline.cache import arrow_store, zarr_store
from pipeline.errors import ConfigError

BACKENDS: dict[str, ModuleType] = {"zarr": zarr_store, "arrow": arrow_store}


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ConfigError(f"cache backend {name!r} is unknown; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name]
