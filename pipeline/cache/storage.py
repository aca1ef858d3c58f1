"""Where a cache lives: a local folder or any fsspec URL (``s3://bucket/prefix``, ...).

Every byte of a cache goes through this module, so the backends never care which.
Small files (the manifest, Arrow shards) are written whole under a temporary name and
then moved into place: on a local disk that is fsync + rename, atomic; on object
storage a single PUT is already all-or-nothing, and it is what is done there.

Locks: processes sharing a cache coordinate through named locks under ``locks/``: an
exclusive ``flock`` on a local disk (released by the kernel when the process dies), a
lease object on object storage (created only if absent, renewed while held, taken over
once expired).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import posixpath
import threading
import time
import uuid

import fsspec

from pipeline.errors import StorageError, WaitTimeout

log = logging.getLogger(__name__)

LOCKS = "locks"
_PLAIN = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def explain_os_error(e: BaseException, path: str, fix: str) -> BaseException:
    """``e`` as a :class:`StorageError` naming ``path`` and ``fix`` when it is one of the
    errors a person can fix (full disk, read-only, permissions); else ``e`` unchanged."""
    if isinstance(e, OSError) and e.errno in _PLAIN:
        return StorageError(e.errno, f"{_PLAIN[e.errno]} writing {path}; {fix}")
    return e


def write_file_atomic(path: str, data: bytes, fix: str = "free space or fix the permissions, then re-run") -> None:
    """Write a local file whole or not at all: a unique temporary name, fsync, rename. On
    failure the temporary is removed and a full disk or read-only path is one clear error."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        err = explain_os_error(e, path, fix)
        if err is e:
            raise
        raise err from e


def check_writable(path: str, what: str) -> None:
    """Fail now, before any work, when the local folder ``path`` (or the nearest folder
    above it that exists) cannot be written: a probe file is created and removed."""
    if "://" in path:
        return  # object storage: its credentials are checked by the first write
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            return  # a file: the cache's own checks name it
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK):  # access(2) answers EROFS even for root; nothing is written
        err = errno.EROFS if _read_only(folder) else errno.EACCES
        raise StorageError(err, f"{_PLAIN[err]} writing {folder}; {what} must be writable: point it at a "
                                "writable folder")


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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

    def isdir(self) -> bool:
        return self.fs.isdir(self.root)

    def exists(self, *parts: str) -> bool:
        self._fresh(self.path(*parts))
        return self.fs.exists(self.path(*parts))

    def _fresh(self, path: str) -> None:
        """Forget what an object store's filesystem cached about ``path``: other writers
        (zarr's own filesystem instance, other processes) change it behind our back."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_atomic(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        if not self.local:
            self.fs.pipe_file(target, data)  # one PUT: visible whole or not at all
            return
        write_file_atomic(target, data, "free space or fix the permissions, then re-run stage 1: committed "
                                        "shards are kept")

    @staticmethod
    def temporary_of(key: str) -> str | None:
        """The object an interrupted local write's leftover belongs to (``<key>.tmp-<id>``
        here, ``<key>.<uuid>.partial`` from zarr's local store), or None."""
        if ".tmp-" in key:
            return key.rsplit(".tmp-", 1)[0]
        if key.endswith(".partial"):
            return key[:-len(".partial")].rsplit(".", 1)[0]
        return None

    def listing(self, *parts: str) -> dict[str, int]:
        """Every object under the cache, or under its folder ``parts`` (path relative to the
        cache -> size in bytes), in one listing."""
        if not self.exists(*parts):
            return {}
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(self.path(*parts), detail=True)
        self._fresh(self.path(*parts))  # the listing must not answer later questions from a cache
        return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items()}

    def top_level(self) -> set[str]:
        """The names directly in the folder (one shallow listing)."""
        self._fresh(self.root)
        return {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}

    def size(self, *parts: str) -> int:
        self._fresh(self.path(*parts))
        return int(self.fs.size(self.path(*parts)))

    def lock(self, name: str, *, blocking: bool = True, timeout_s: float = 24 * 3600.0) -> Lock | None:
        """Hold the lock ``name`` of this cache: a :class:`Lock` (release it, or use it as a
        context manager), or None when ``blocking`` is False and another process holds it."""
        lock = FileLock(self, name) if self.local else Lease(self, name)
        deadline = time.monotonic() + timeout_s
        while not lock.try_acquire():
            if not blocking:
                return None
            if time.monotonic() > deadline:
                raise WaitTimeout(f"lock {name!r} of {self.url} still held by another process after {timeout_s:.0f}s")
            time.sleep(0.2)
        return lock

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    def clear(self, names: set[str]) -> None:
        """Delete the top-level entries ``names`` (and nothing else) from the folder."""
        for name in sorted(names & self.top_level()):
            self.fs.rm(self.path(name), recursive=True)

    def makedirs(self, *parts: str) -> None:
        if self.local:
            os.makedirs(self.path(*parts), exist_ok=True)

    def zarr_store(self, *parts: str, read_only: bool = False):
        """A Zarr store over this folder (or its subfolder ``parts``)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(*parts), read_only=read_only)
        url = "/".join([self.url.rstrip("/"), *parts])
        return FsspecStore.from_url(url, storage_options=self.options or None, read_only=read_only)


class Lock:
    name: str

    def try_acquire(self) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class FileLock(Lock):
    """An exclusive ``flock`` on ``locks/<name>.lock``: the kernel drops it if the process dies."""

    def __init__(self, storage: Storage, name: str):
        self.name, self.path, self.fd = name, storage.path(LOCKS, f"{name}.lock"), None

    def try_acquire(self) -> bool:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise explain_os_error(e, self.path, "the cache folder must be writable") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:  # ENOSYS / ENOLCK / EOPNOTSUPP: a file system without flock
            os.close(fd)
            raise StorageError(e.errno, f"file locks (flock) are not supported where the cache lives ({self.path}: "
                                        f"{e.strerror}); mount that file system with locking enabled (e.g. "
                                        "Lustre: -o flock) or put cache.path on a local disk") from e
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Lease(Lock):
    """A lease object ``locks/<name>.lease`` on object storage: created only when absent
    (``mode="create"``: a conditional PUT, ``If-None-Match: *``), renewed every
    ``ttl_s / 3`` by a thread while held (``If-Match`` on its own last version, so a lease
    taken over meanwhile is noticed, never overwritten), and taken over by another process
    once ``ttl_s`` passed without renewal (a holder that died), again by ``If-Match`` on the
    expired version, so two processes cannot both take it over. Expiry is judged by wall
    clocks: machines sharing a cache need clocks within a few seconds of each other."""

    ttl_s = 60.0

    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name
        self.key, self.owner = storage.path(LOCKS, f"{name}.lease"), f"{os.getpid()}-{uuid.uuid4().hex}"
        self.etag: str | None = None
        self.lost = False
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s}).encode()

    @staticmethod
    def _refused(e: Exception) -> bool:
        text = str(e)
        return isinstance(e, FileExistsError) or "412" in text or "409" in text or "re-conditions" in text

    def _put(self, **condition) -> bool:
        """One conditional PUT of a fresh body; False when the condition did not hold."""
        try:
            out = self.storage.fs.pipe_file(self.key, self._body(), **condition)
        except OSError as e:
            if self._refused(e):
                return False
            raise
        self.storage._fresh(self.key)
        self.etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        if self.etag is None:
            self.etag = self.storage.fs.info(self.key).get("ETag")
        return True

    def try_acquire(self) -> bool:
        fs = self.storage.fs
        self.storage._fresh(self.key)
        try:
            info = fs.info(self.key)
        except FileNotFoundError:
            ok = self._put(mode="create")
        else:
            try:
                held = json.loads(fs.cat_file(self.key))
            except FileNotFoundError:
                return False  # released between the two reads: try again later
            except ValueError:
                held = {"expires": 0.0}  # unreadable: treat as expired
            if held.get("expires", 0.0) > time.time():
                return False
            ok = self._put(IfMatch=info.get("ETag"))  # take over exactly the expired version
        if ok:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._renew, args=(self._stop,), daemon=True,
                                            name=f"lease-{self.name}")
            self._thread.start()
        return ok

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_s / 3):
            try:
                if not self._put(IfMatch=self.etag):
                    self.lost = True
                    log.warning("lease %s was taken over by another process (renewals failed for %.0fs)",
                                self.key, self.ttl_s)
                    return
            except Exception as e:  # noqa: BLE001 - a missed renewal only shortens the lease
                log.warning("could not renew lease %s: %s", self.key, e)

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._thread.join()  # no renewal in flight can recreate the lease after the delete
        self._stop = self._thread = None
        if self.lost:
            return
        try:
            self.storage._fresh(self.key)
            if self.storage.fs.info(self.key).get("ETag") == self.etag:  # still ours
                self.storage.fs.rm_file(self.key)
        except FileNotFoundError:
            pass
