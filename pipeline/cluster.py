"""Which Dask scheduler stage 2's jobs run on: ``dask.scheduler=sync|threads|distributed|<address>``.

``distributed`` starts a ``LocalCluster`` for the run; an address (``tcp://host:8786``)
connects to an existing cluster. The client is never made the process-wide default (a
``distributed.Client`` silently becomes the scheduler of every later ``.compute()``, and
costs 8-17 ms per block here, which would slow stage 3's stream): it is passed explicitly
to the jobs that should use it.
"""

from __future__ import annotations

import contextlib
import logging

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

LOCAL = ("sync", "synchronous", "threads", "processes")


@contextlib.contextmanager
def scheduler(name: str, workers: int | None = None):
    """Yield what ``dask.compute(..., scheduler=...)`` takes for ``name``."""
    if name in LOCAL:
        yield "synchronous" if name == "sync" else name
        return
    from distributed import Client, LocalCluster

    if name == "distributed":
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster, set_as_default=False) as client:
            log.info("dask: started a LocalCluster with %d worker(s)", len(client.scheduler_info()["workers"]))
            yield client
        return
    if "://" not in name and ":" not in name:
        raise ConfigError(f"dask.scheduler={name!r}: expected sync, threads, processes, distributed, or a scheduler "
                         "address such as tcp://127.0.0.1:8786")
    with Client(name, set_as_default=False, timeout="30s") as client:
        log.info("dask: connected to %s (%d workers)", name, len(client.scheduler_info()["workers"]))
        yield client
