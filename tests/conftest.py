"""Shared fixtures: a tiny real cache written by the real writer, and, once per test run
(:func:`once_per_run`, shared by the test processes), a fitted MNIST-1D teacher with its
dataset and a captured cache, a tiny random-weight causal LM and task=lm's small tokenized
corpus, which tests copy from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.run import set_environment_defaults

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of `make test`'s two processes on two cores: one thread each for torch and Numba
    # (and the processes a test starts), rather than two each contending for both cores
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
set_environment_defaults()  # as the CLI does, before torch and Numba load

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.config import register  # noqa: E402

register()
# (the helpers of tests/support.py, which import torch, are imported where used: the process
# that hands the tests to xdist's two workers then starts in a second, not seven)

# `make test` runs the suite in two processes (pytest-xdist). The test files below share an
# expensive module-scoped fixture (the real GGUF teacher and its cache, the CLI's token cache,
# the uninterrupted reference capture, the S3 server, a full CLI run) or compile the same
# Numba kernels (the distances, stage 1's row pass: compiled once, the second process would
# compile them too before the first had saved them): each goes to one process whole; every other test is
# handed out on its own. The longest go first, so no process is left with one at the end.
SHARED = ("tests/tasks/test_lm.py", "tests/test_trust.py", "tests/tasks/test_lm_cli.py", "tests/cache/test_s3.py",
          "tests/test_cli.py", "tests/kernels/test_distances.py", "tests/kernels/test_teacher_rows.py",
          "tests/kernels/test_buckets.py")
FIRST = ("tests/tasks/test_lm.py", "tests/test_trust.py", "tests/tasks/test_lm_cli.py",
         "tests/kernels/test_distances.py", "tests/test_student_resume.py", "tests/cache/test_s3.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(FIRST)))  # (stable: the rest in order)


def pytest_xdist_make_scheduler(config, log):
    """xdist's own ``loadgroup`` cannot group here (it renames ``item._nodeid``, which pytest 9
    no longer reads), so the grouping is a scheduler: a SHARED file is one unit of work,
    any other test a unit of its own, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in SHARED else nodeid

    config.option.loadscopereorder = False
    return SharedFixtureScheduling(config, log)


@pytest.fixture
def tiny_logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((100, 7)) * 3).astype(np.float32)


@pytest.fixture
def tiny_cache(tmp_path, tiny_logits):
    path = tmp_path / "cache"
    from tests.support import write_cache

    write_cache(path, tiny_logits, splits={"transfer": [0, 60], "train": [60, 90], "test": [90, 100]})
    return str(path)


def once_per_run(tmp_path_factory, name: str, build) -> Path:
    """``<this run's temporary folder>/<name>``, made by ``build(folder)`` once for the whole
    test run: by whichever of the test processes asks first, the other waiting for it on a
    file lock (under xdist the run's folder holds each process's own, gw0 and gw1)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # (what a build that failed part-way left)
            folder.mkdir()
            build(folder)
            done.write_text("")
    return folder


@pytest.fixture(scope="session")
def classify_root(tmp_path_factory):
    """A ``paths.root`` where stage 1 ran once on the shrunken default (tests.support.SMALL):
    the generated dataset, the fitted teacher and the default cache, once per test run.
    Read it; never write."""
    from tests.support import run_cli

    return once_per_run(tmp_path_factory, "classify", lambda root: run_cli(root, "stage=1"))


@pytest.fixture
def seeded(tmp_path, classify_root):
    """An empty ``paths.root`` holding the session's dataset and fitted teacher (not its
    cache): stage 1 here captures without fitting the teacher again."""
    from tests.support import seed_root

    seed_root(tmp_path, classify_root)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A teacher for LM tests whose subject is not the real teacher's numbers: a 2-layer
    Llama of random weights (spread wide enough that its distributions differ by position)
    with SmolLM2's tokenizer and vocabulary, saved as a Hugging Face folder once per test
    run. The overrides that make it the run's teacher."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tasks.lm.models import load_tokenizer
    from tests.support import compose_config

    def build(folder):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                     tie_word_embeddings=True)).save_pretrained(folder)
        cfg = compose_config("task=lm")
        load_tokenizer(cfg.teacher, cfg.paths.conversions).save_pretrained(folder)

    folder = once_per_run(tmp_path_factory, "tiny-lm", build)
    return ["teacher=hf_causal_lm", f"teacher.path={folder}"]


@pytest.fixture(scope="session")
def lm_tokens(tmp_path_factory, tiny_lm):
    """A ``paths.root`` whose ``datasets/`` holds task=lm's small run (tests.support.LM_SMALL:
    Shakespeare, SmolLM2's tokenizer, which the tiny teacher shares) tokenized, once per
    test run. Tokenizing all of Shakespeare takes 10 s; the tests copy the result into their
    own roots (:func:`tests.support.seed_root`). Read it; never write."""
    from pipeline.tasks.lm.models import load_tokenizer
    from pipeline.tasks.lm.text import load_tokens
    from tests.support import LM_SMALL, compose_config

    def build(root):
        cfg = compose_config(*LM_SMALL)
        load_tokens(cfg.data, str(root), load_tokenizer(cfg.teacher, cfg.paths.conversions))

    return once_per_run(tmp_path_factory, "lm-tokens", build)

