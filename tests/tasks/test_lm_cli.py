"""task=lm through the real CLI, with the tiny random-weight teacher (its subject is the
pipeline, not the real teacher's numbers: those are tests/tasks/test_lm.py's): all three
stages, a student killed and resumed, two processes training like one."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import LM_SMALL as SMALL
from tests.support import lm_small as small
from tests.support import run_cli, seed_root


def test_the_cli_runs_task_lm(tiny_lm, lm_tokens, tmp_path):
    """All three stages through the real CLI, on a few hundred tokens (the tiny teacher: the
    GGUF teacher's capture and evaluation are lm_cache's, through the same task methods)."""
    seed_root(tmp_path, lm_tokens)
    out = run_cli(tmp_path, *SMALL, *tiny_lm, "lm.variants=[labels,topk_kl:8,sampled_kl]", small=False)
    assert "| causal_lm | topk_kl:8 | 52 |" in out.stdout and "| teacher |" in out.stdout
    assert "10% keep less than" in out.stdout
    from transformers import LlamaForCausalLM

    saved = glob.glob(str(tmp_path / "runs" / "*" / "students" / "causal_lm" / "topk_kl-8"))
    assert len(saved) == 1 and LlamaForCausalLM.from_pretrained(saved[0]).config.vocab_size == 49152


TINY = ["student.causal_lm.kwargs.hidden_size=32", "student.causal_lm.kwargs.intermediate_size=64",
        "student.causal_lm.kwargs.num_hidden_layers=1"]
# one thread each: bit-equal weights across processes need the same reduction order
ONE_THREAD = dict(OMP_WAIT_POLICY="passive", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory, tiny_lm, lm_tokens):
    """A paths.root whose token cache stage 1 wrote once, through the CLI, from the tiny
    teacher, for the CLI training tests (each writes its run folders under its own tmp_path)."""
    root = tmp_path_factory.mktemp("cli")
    seed_root(root, lm_tokens)
    run_cli(root, *SMALL, *tiny_lm, "stage=1", "lm.variants=[topk_kl]", small=False)
    return root


def runs_in(tmp_path) -> str:
    return "hydra.run.dir=" + str(tmp_path / "runs") + "/${now:%H-%M-%S}-${pid:}"


def test_an_lm_student_killed_mid_training_resumes_to_the_same_steps_and_weights(cli_root, tiny_lm, tmp_path):
    """The one training loop gives LM students what classifier students had: a kill after
    a checkpoint (every 2 steps here) resumes to the uninterrupted run's steps and weights."""
    import signal
    import time

    from safetensors.torch import load_file

    args = [*small("train.steps=16", "train.checkpoint_every=2"), *TINY, *tiny_lm, f"paths.root={cli_root}",
            "lm.variants=[topk_kl]", runs_in(tmp_path)]
    env = {**os.environ, **ONE_THREAD}

    def cli(*extra, check=True):
        proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args, *extra], capture_output=True, text=True,
                              timeout=600, env=env)
        assert not check or proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # the uninterrupted run, from scratch (train.resume=false: it keeps no state), beside the
    # killed one: one thread each, on a core each
    log = open(tmp_path / "fresh.log", "w+")  # (a file, not a pipe nobody reads while it runs)
    fresh = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args, "stage=3", "train.resume=false"],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    p = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args, "stage=3"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    pattern = str(cli_root / "students" / "*" / "*" / "state.pt")
    deadline = time.monotonic() + 300
    while not glob.glob(pattern) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed, not finished
    (state,) = glob.glob(pattern)
    assert 0 < torch.load(state, weights_only=False)["step"] < 16

    resumed = cli("stage=3")
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert fresh.wait(timeout=600) == 0, open(log.name).read()[-3000:]
    saved = sorted(glob.glob(str(tmp_path / "runs" / "*" / "students" / "causal_lm" / "topk_kl" / "model.safetensors")))
    assert len(saved) == 2
    a, b = (load_file(f) for f in saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.load(open(os.path.join(os.path.dirname(f), "..", "..", "..", "results.json")))["students"][0]["steps"]
             for f in saved]
    assert steps == [16, 16]


def test_two_processes_train_like_one_process_with_twice_the_batch(cli_root, tiny_lm, tmp_path):
    """torchrun --nproc_per_node=2 stage=3 (gloo on CPU): each process reads its own half of
    every batch of 6 sequences and DistributedDataParallel averages the gradients, so it
    ends where one process with the whole batch of 6 does. Equal up to float rounding when
    the halves hold as many tokens (here every training sequence is 48 long): tolerance 1e-3
    relative on the last loss and the held-out perplexity."""
    import socket

    args = [*small("train.steps=8"), *TINY, *tiny_lm, f"paths.root={cli_root}", "lm.variants=[topk_kl]", "train.resume=false",
            runs_in(tmp_path)]
    env = {**os.environ, **ONE_THREAD}

    def run(*cmd):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    run_cli(cli_root, *args, "stage=3", "train.batch_size=6", small=False)  # one process: this one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
        "-m", "pipeline.run", *args, "stage=3", "train.batch_size=3")
    rows = {}
    for path in glob.glob(str(tmp_path / "runs" / "*" / "results.json")):
        (row,) = json.load(open(path))["students"]
        rows[row["processes"]] = row
    one, two = rows[1], rows[2]
    assert one["steps"] == two["steps"] == 8
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-3)
    assert two["heldout_perplexity"] == pytest.approx(one["heldout_perplexity"], rel=1e-3)
