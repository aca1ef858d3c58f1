"""The real CLI with every shard write slowed down, so a crash test can kill it inside a
write: ``python -m tests.slow_writes SECONDS <pipeline.run arguments>``. The pause (after
each array of a shard) is injected here, by wrapping the Zarr backend's ``write_shard``;
the library has no test hook of its own."""

from __future__ import annotations

import runpy
import sys
import time


def main() -> None:
    from pipeline.cache import zarr_store

    pause = float(sys.argv[1])
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    write_shard = zarr_store.write_shard

    def slow(storage, m, shard, arrays):
        for name, values in arrays.items():
            write_shard(storage, m, shard, {name: values})
            time.sleep(pause)

    zarr_store.write_shard = slow
    runpy.run_module("pipeline.run", run_name="__main__")


if __name__ == "__main__":
    main()
