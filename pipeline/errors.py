"""The errors a user can fix, and only those.

The entry point (:mod:`pipeline.run`) prints a :class:`UserError` as one line that says
what was wrong and how to fix it, with no traceback. Every other exception is a bug (ours
or a library's) and keeps its traceback.

Each class also derives from the built-in exception that callers have always caught
(``ValueError``, ``FileNotFoundError``, ``OSError``, ``TimeoutError``), so code that
catches those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a setting, an input, a cache, a place to write."""


class ConfigError(UserError, ValueError):
    """A setting out of range, or settings that contradict each other or the cache."""


class DataError(UserError, ValueError):
    """The dataset or corpus: a missing column, a malformed line, too few rows."""


class DataNotFound(UserError, FileNotFoundError):
    """No dataset, corpus, model or package where the config points."""


class CacheError(UserError, ValueError):
    """A cache that is incomplete, damaged, or was captured with other settings."""


class CacheNotFound(UserError, FileNotFoundError):
    """No cache where the config points."""


class StorageError(UserError, OSError):
    """A write that failed for a reason the user can fix (disk full, read-only, no
    permission): one line naming the path, the reason and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


class WaitTimeout(UserError, TimeoutError):
    """Waited too long for another process (a lease holder, a cluster)."""
