"""Helpers shared by the test modules: the CLI (in this process, or as a process of its own
where a process boundary is under test), the composed config, and a cache written by the
real writer. Fixtures live in ``conftest.py``; helpers live here, never in a test module."""

from __future__ import annotations

import io
import itertools
import logging
import os
import shutil
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pipeline.cache import CacheWriter, Manifest, Storage, make_fingerprint, plan_shards
from pipeline.cache.format import SequenceIndex
from pipeline.config import Config
from pipeline.representations import host_arrays, represent

# the built-in MNIST-1D default, shrunk: a run of all three stages takes seconds
SMALL = ["data.train_size=400", "data.test_size=200", "data.transfer_size=1500", "teacher.fit.epochs=30",
         "train.epochs=1", "cache.chunk_rows=256", "cache.shard_chunks=2"]


# task=lm on a few hundred tokens: 6 training sequences of at most 48 tokens, 4 held out
LM_SMALL = ["task=lm", "data.train_size=6", "data.test_size=4", "data.seq_len=48", "cache.chunk_rows=32",
         "cache.shard_chunks=2", "cache.k=16", "cache.samples=8", "train.steps=1", "train.batch_size=3",
         "lm.eval_batch_size=2"]


def lm_small(*overrides: str) -> list[str]:
    """LM_SMALL with ``overrides`` replacing its values of the same keys."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in LM_SMALL if a.split("=", 1)[0] not in keys] + list(overrides)


@dataclass
class Cli:
    """What a run of the CLI left: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


_runs = itertools.count()


def run_cli(root, *args, code: int | None = 0, env_extra: dict | None = None, small: bool = True,
            timeout: float = 600, process: bool = False) -> Cli:
    """``python -m pipeline.run paths.root=<root> [SMALL] <args>``; its exit code must be
    ``code`` (None: any). It runs in this process unless ``process`` is set or ``env_extra``
    (an environment read at a process's start, such as thread counts) is given."""
    given = any(a.startswith("paths.root=") for a in args)
    flags = [a for a in args if a.startswith("-")]  # (-m: a sweep) before the overrides, as argparse wants
    argv = [*flags, *([] if given else [f"paths.root={root}"]), *(SMALL if small else []),
            *(a for a in args if not a.startswith("-"))]
    if process or env_extra:
        env = dict(os.environ, OMP_WAIT_POLICY="passive", **(env_extra or {}))
        env.pop("HYDRA_FULL_ERROR", None)
        p = subprocess.run([sys.executable, "-m", "pipeline.run", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env)
        out = Cli(p.returncode, p.stdout, p.stderr)
    else:
        out = _run_here(argv)
    assert code is None or out.returncode == code, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _run_here(argv: list[str]) -> Cli:
    """The entry point as ``python -m pipeline.run`` runs it, in this process: its own run
    folder each time (the default names one per second and process), what it prints
    captured, an escaping exception printed with its traceback as Python would."""
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import run as entry

    root = next(a.split("=", 1)[1] for a in argv if a.startswith("paths.root="))
    stamp = f"${{now:%Y-%m-%d_%H-%M-%S}}-{os.getpid()}-{next(_runs):04d}"
    for key, folder in (("hydra.run.dir", "runs"), ("hydra.sweep.dir", "multiruns")):
        if not any(a.startswith(key + "=") for a in argv):
            argv = [*argv, f"{key}={root}/{folder}/{stamp}"]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_full = sys.argv, os.environ.pop("HYDRA_FULL_ERROR", None)
    root_logger = logging.getLogger()
    saved_handlers, saved_level = root_logger.handlers[:], root_logger.level
    code = 0
    sys.argv = ["pipeline/run.py", *argv]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                entry.check_arguments(argv)
                entry.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: B036 - as the interpreter would: printed, exit 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        if saved_full is not None:
            os.environ["HYDRA_FULL_ERROR"] = saved_full
        GlobalHydra.instance().clear()
        for h in root_logger.handlers[:]:
            if h not in saved_handlers:
                root_logger.removeHandler(h)
                h.close()
        root_logger.setLevel(saved_level)
    return Cli(code, out.getvalue(), err.getvalue())


def error_line(proc: Cli) -> str:
    """The one error a failed run logged: its message (a line, or a line and the list it
    announces), with no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [i for i, ln in enumerate(out.splitlines()) if "[ERROR]" in ln]
    assert len(errors) == 1, out[-3000:]
    return "\n".join(out.splitlines()[errors[0]:])


def seed_root(dst, src, *, caches: bool = False) -> None:
    """Give the empty ``paths.root`` ``dst`` the dataset and fitted teacher (and, with
    ``caches``, the caches) that a run under ``src`` made, so a test's stage 1 captures
    without fitting the teacher again."""
    for part in ("datasets", "teachers", *(["caches"] if caches else [])):
        if os.path.isdir(os.path.join(src, part)):
            shutil.copytree(os.path.join(src, part), os.path.join(dst, part), dirs_exist_ok=True)


def compose_config(*overrides: str) -> Config:
    """The real config tree, composed as the CLI does, shrunk by overrides."""
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def write_cache(path, logits: np.ndarray, *, dtype: str = "float16", chunk_rows: int = 16,
                shard_chunks: int = 2, splits: dict | None = None, fields: dict | None = None,
                backend: str = "zarr", modes=("full",), k: int = 3, samples: int = 8,
                temperatures=(1.0, 2.0), sample_temperature: float = 1.0, compression: str = "ints",
                offsets: np.ndarray | None = None, positions: np.ndarray | None = None,
                tokenizer: bytes | None = None, narrow: bool = False, value_bits: int = 16,
                top_p: float = 0.0) -> Manifest:
    """Write ``logits`` (N, C) as a complete cache through the real writer and the real
    representations code (top-k, sampling) on CPU; with ``offsets``, rows are the tokens of
    sequences (a row's id is its sequence's index), at ``positions`` when given, with the
    teacher's ``tokenizer`` JSON when given."""
    n, c = logits.shape
    shard_rows = chunk_rows * shard_chunks
    m = Manifest(backend=backend, modes=sorted(modes), dtype=dtype, num_classes=c, rows=n, chunk_rows=chunk_rows,
                 shard_rows=shard_rows, splits=splits or {"train": [0, n]},
                 fingerprint=make_fingerprint(fields or {"dataset": "test"}), shards=plan_shards(n, shard_rows),
                 k=k if "topk" in modes else 0, samples=samples if "sampled" in modes else 0,
                 temperatures=list(temperatures), sample_temperature=sample_temperature, compression=compression,
                 narrow=narrow, value_bits=value_bits if "topk" in modes else 16, top_p=top_p)
    ids = np.arange(n, dtype=np.int64)
    index = None
    if offsets is not None:
        index = SequenceIndex(offsets, positions, tokenizer)
        index.describe(m)
        ids = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    t = torch.from_numpy(logits.astype(np.float32))
    with CacheWriter(storage=Storage(str(path)), manifest=m, index=index) as w:
        for shard in w.pending():
            gen = torch.Generator().manual_seed(shard.index)
            arrays = host_arrays(represent(t[shard.start:shard.stop], m, gen), m)
            arrays["ids"] = ids[shard.start:shard.stop]
            w.submit(shard, arrays)
    return w.manifest


def train_variant(task, name: str, spec, variant, data, reader, device=None, save_dir: str | None = None) -> dict:
    """One LM student variant through the engine's student run (what stage 3 does for each)."""
    from pipeline.students import train_student

    run = task.student_run(name, spec, variant, data, reader, device or torch.device("cpu"))
    return train_student(run, reader, task.cfg.train, root=task.root, save_dir=save_dir)
