"""The task plug-in interface, and what every task shares: the cache's location, its
capture through the one engine, its checked opening."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterable

import numpy as np

from pipeline.cache import CacheReader, Storage, cache_location, open_cache
from pipeline.cache.fingerprint import capture_settings
from pipeline.cache.format import MARKER, Manifest, SequenceIndex, identify
from pipeline.cache.storage import explain_os_error
from pipeline.capture import RowSource, capture
from pipeline.config import Config, resolve_root
from pipeline.device import PRECISION_MEMO, choose_device, resolve_precision
from pipeline.processes import Processes, resolve_processes
from pipeline.students import StudentRun

log = logging.getLogger(__name__)


class Task:
    """What differs between tasks. Bound to the run's config (``self.cfg``): plug-ins are
    where the whole config is read; the library below them takes sections and values."""

    name = ""

    def __init__(self, cfg: Config, processes: Processes | None = None):
        self.cfg = cfg
        self.root = resolve_root(cfg)
        # where this process stands in its job (the entry point resolves it from torchrun's
        # environment; without one, from the config alone)
        self.processes = processes or resolve_processes(cfg)

    # -- config ---------------------------------------------------------------------------
    @staticmethod
    def validate(cfg: Config, problems: list[str]) -> None:
        """Append this task's config problems to ``problems``."""

    # -- data and teacher (stage 1) -------------------------------------------------------
    def load_data(self):
        raise NotImplementedError

    def load_teacher(self, data):
        raise NotImplementedError

    def plan(self, teacher, data) -> tuple[Manifest, SequenceIndex | None]:
        """The new cache's manifest (and, for token rows, where each sequence's rows are)."""
        raise NotImplementedError

    def rows(self, teacher, data, device) -> RowSource:
        raise NotImplementedError

    def after_capture(self, teacher, data, cache_url: str) -> None:
        """Anything the task keeps beside the cache while it still has the teacher."""

    def capture(self, teacher, data, url: str | None = None) -> Manifest:
        """The teacher over every row of ``data`` into the cache at ``url`` (default: this
        run's), through the one capture engine; resumes a started cache. Stage 1 then calls
        :meth:`after_capture`."""
        cfg = self.cfg
        url = url or self.cache_url(data)
        device = choose_device(cfg.teacher.device)
        rank, world = self.processes.rank, self.processes.world_size
        manifest, index = self.plan(teacher, data)
        m = capture(self.rows(teacher, data, device), manifest, Storage(url, cfg.cache.storage_options),
                    device=device, max_full_gb=cfg.cache.max_full_gb, zstd_level=cfg.cache.zstd_level, rank=rank,
                    world_size=world, index=index, overwrite=cfg.cache.overwrite, verify=cfg.verify)
        return m

    # -- the cache (stages 2 and 3) -------------------------------------------------------
    def cache_key(self, data) -> str:
        raise NotImplementedError

    def expected_fields(self, data) -> dict:
        """The fingerprint fields a reader checks, known without the teacher model."""
        raise NotImplementedError

    def cache_url(self, data) -> str:
        return cache_location(self.cfg.cache.path, self.root, self.cache_key(data))

    def open_cache(self, data, num_classes: int | None = None) -> CacheReader:
        """The cache this run points at, checked: its width, then every fingerprint field."""
        return open_cache(self.cache_url(data), expected=self.expected_fields(data),
                          storage_options=self.cfg.cache.storage_options, num_classes=num_classes)

    def row_labels(self, data, reader: CacheReader) -> np.ndarray:
        """(rows,) int64: each cache row's label (-1: none), for the audit's accuracy."""
        raise NotImplementedError

    # -- students (stage 3) ---------------------------------------------------------------
    def student_runs(self, data, reader: CacheReader, device) -> Iterable[StudentRun]:
        """The students to train, one :class:`pipeline.students.StudentRun` (one results
        row) each, built when asked for: :func:`pipeline.students.train_students` trains them."""
        raise NotImplementedError

    def results(self, rows: list[dict], reader: CacheReader) -> tuple[dict, str]:
        """What ``results.json`` holds besides the rows, and the table printed."""
        raise NotImplementedError

    def publish(self, rows: list[dict], reader: CacheReader) -> None:
        """Anything shared across runs of this cache (a leaderboard)."""

    # -- shared -----------------------------------------------------------------------------
    def capture_settings(self, precision: str) -> dict:
        """The cache's representation settings (the fingerprint's ``capture`` field) for a
        teacher running in ``precision`` (the configured value in the cache's folder key,
        ``auto`` included; the resolved one in its fingerprint)."""
        return capture_settings(self.cfg.cache, precision)

    def teacher_precision(self, data) -> str:
        """``teacher.precision``; for ``auto``, the precision the cache at this run's location
        was captured in (so every stage, on any machine, reads what stage 1 wrote), else the
        faster on this machine (:func:`pipeline.device.resolve_precision`, on the teacher's
        matmul shapes)."""
        configured = self.cfg.teacher.precision.value
        if configured != "auto":
            return configured
        if "_precision" not in self.__dict__:
            url = self.cache_url(data)
            recorded = captured_precision(Storage(url, self.cfg.cache.storage_options))
            if recorded:
                log.info("teacher.precision=auto -> %s, the precision the cache at %s was captured in", recorded, url)
            self._precision = recorded or resolve_precision(
                "auto", choose_device(self.cfg.teacher.device), self.matmul_shapes(data),
                memo=os.path.join(self.cfg.paths.conversions, PRECISION_MEMO))
        return self._precision

    def matmul_shapes(self, data) -> list[tuple[int, int]]:
        """The teacher's matmuls, as (in, out) features: what ``precision=auto`` measures."""
        raise NotImplementedError


def captured_precision(storage: Storage) -> str | None:
    """The teacher precision recorded in the plan of the cache at ``storage`` (None: no
    cache there, or one that records none; a path that cannot hold one is the capture's to
    explain)."""
    try:
        _, plan, _ = identify(storage, MARKER)
    except OSError:
        return None
    return plan.fingerprint.get("fields", {}).get("capture", {}).get("precision") if plan else None


def save_dataset_atomic(dsd, path: str) -> None:
    """Save an HF DatasetDict under a unique temporary name, then rename: a killed save
    leaves no folder that looks complete, and workers preparing the same data do not collide."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dsd.save_to_disk(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = explain_os_error(e, path, "free space or fix the permissions of paths.root, then re-run")
        if err is e:
            raise
        raise err from e
    try:
        os.rename(tmp, path)
        log.info("saved dataset to %s", path)
    except OSError:  # another worker got there first with the same content
        shutil.rmtree(tmp, ignore_errors=True)
