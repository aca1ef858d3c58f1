"""Where a cache lives: a local folder or any fsspec URL (``s3://bucket/prefix``, ...).

Every byte of a cache goes through this module, so the backends never care which.
Small files (the manifest, Arrow shards) are written whole under a temporary name and
then moved into place: on a local disk that is fsync + rename, atomic; on object
storage a single PUT is already all-or-nothing, and it is what is done there.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid

import fsspec


def fault_pause() -> None:
    """Test hook for crash tests: sleep ``KD_TEST_WRITE_PAUSE_S`` seconds in the middle of
    a shard write, so a test can kill the process there. Unset in normal use."""
    delay = float(os.environ.get("KD_TEST_WRITE_PAUSE_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


class Storage:
    """A cache folder addressed by a local path or an fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.options)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return self.path(*parts) if self.local else f"{self.fs.protocol[0]}://{self.path(*parts)}"

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_atomic(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        if not self.local:
            self.fs.pipe_file(target, data)  # one PUT: visible whole or not at all
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_pause()
        os.replace(tmp, target)

    def remove_temporaries(self) -> int:
        """Delete leftover ``*.tmp-*`` files of an interrupted local write; return how many."""
        if not self.local or not os.path.isdir(self.root):
            return 0
        n = 0
        for d, _, files in os.walk(self.root):
            for f in files:
                if ".tmp-" in f:
                    os.remove(os.path.join(d, f))
                    n += 1
        return n

    def listing(self) -> set[str]:
        """Every object path under the cache (relative), in one listing."""
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):] for p in self.fs.find(self.root)} if self.fs.exists(self.root) else set()

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    def makedirs(self, *parts: str) -> None:
        if self.local:
            os.makedirs(self.path(*parts), exist_ok=True)

    def zarr_store(self, read_only: bool = False):
        """A Zarr store over this folder."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.options or None, read_only=read_only)
