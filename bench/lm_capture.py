"""Stage 1 for task=lm: the whole token capture (forward, real-token selection, top-K +
logsumexp and sampling over the vocabulary, host copies, background writes) over the bare
teacher forward passes on the same sequences, same packed batches, the same rows kept,
measured alternately.

    .venv/bin/python bench/lm_capture.py [--repeats N] [hydra overrides, e.g. data.train_size=64 cache.modes=[topk]]

Each repeat runs the bare forward, then stage 1 (then, on CPU, stage 1 with the torch
composition); the ratio is of the fastest of each over the repeats (default 3: the teacher
forward alone varies by up to 10% from one pass to the next on a shared 2-core machine), and
each repeat's own ratio is printed too. It also times this machine's matmuls at the teacher's
own shapes (its linear layers, a batch's rows) in the resolved precision and gives the
capture's achieved teacher FLOP/s over that figure: ``capture_vs_matmul`` (1.0: the capture
runs the teacher as fast as this machine multiplies its matrices). ``--precisions
auto,fp32,bf16`` measures each teacher precision, after one untimed warm-up capture each,
alternately repeat by repeat, and gives ``auto_vs_fastest``: the default's stage 1 time over
the fastest explicit precision's. ``--students causal_lm,teacher_layers`` then trains each
student on the cache just captured, through stage 3's own fit (its loss, fused head and
optimizer; a warm-up fit, then a timed one), and gives ``step_vs_matmul``: its forward +
backward FLOP/s (3x the forward's) over this machine's matmuls at the student's own shapes
in its training precision. The last line is one JSON object (the first precision's
figures, the students', the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import pipeline.capture
from pipeline.cache import ShardRecord, open_cache
from pipeline.config import register
from pipeline.device import (
    PRECISION_MEMO,
    choose_device,
    machine,
    matmul_seconds,
    resolve_precision,
)
from pipeline.representations import represent, represent_torch
from pipeline.students import fit, linear_shapes
from pipeline.tasks import validate
from pipeline.tasks.lm import LanguageModel, TokenRows
from pipeline.tasks.lm.models import load_teacher
from pipeline.tasks.lm.text import load_tokens


@torch.inference_mode()
def bare_forward(model, data, batch_size: int, pad_id: int, device) -> None:
    """The teacher's forward passes as stage 1 runs them (the same packed batches, the same
    rows kept), and nothing else."""
    rows = TokenRows(model, data, batch_size, pad_id, device)
    for _ in rows.logits(ShardRecord(0, 0, int(data.offsets[-1]))):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_matmuls(model) -> list[tuple[int, int, int]]:
    """The model's linear layers as (in, out, how many): its matmuls."""
    counts = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    return [(k, n, c) for (k, n), c in counts.items()]


def forward_flops(model, lengths: np.ndarray) -> float:
    """A causal LM's forward FLOPs over sequences of ``lengths`` tokens: 2 per weight of every
    matmul per token, and the attention's scores and weighted sums (4 x hidden x context per
    layer)."""
    config = model.config
    lengths = np.asarray(lengths, np.float64)
    context = float((lengths * (lengths + 1) / 2).sum())  # sum over tokens of the positions attended
    weights = sum(k * n * c for k, n, c in teacher_matmuls(model))
    return 2.0 * weights * float(lengths.sum()) + 4.0 * config.hidden_size * config.num_hidden_layers * context


def matmul_gflops(matmuls: list[tuple[int, int, int]], precision: str, rows: int) -> float:
    """This machine's speed on the teacher's own linear layers, (rows, in) inputs through each
    (out, in) weight as often as the model has it, timed as ``precision=auto`` times them
    (:func:`pipeline.device.matmul_seconds`; a shape slower than 5 s a pass is timed once)."""
    seconds = sum(matmul_seconds(precision, [(k, n)], rows, limit=5.0) * c for k, n, c in matmuls)
    return sum(2.0 * rows * k * n * c for k, n, c in matmuls) / seconds / 1e9


class Measured:
    """One teacher precision's bare forward and stage 1 (auto resolved), timed a repeat at a
    time so that several precisions alternate, repeat by repeat, on the same machine."""

    def __init__(self, cfg, tmp: str, torch_composition: bool):
        self.cfg, self.tmp, self.torch_composition = cfg, tmp, torch_composition
        self.teacher = load_teacher(cfg.teacher, cfg.paths.conversions)
        self.precision, self.label = self.teacher.identity["precision"], cfg.teacher.precision.value
        self.task = LanguageModel(cfg)
        _ = self.task.tokenizer  # loaded once: a fixed cost per run, not per token
        self.device = choose_device(cfg.teacher.device)
        self.model = self.teacher.model.to(self.device)
        self.data = load_tokens(cfg.data, tmp, self.teacher.tokenizer)
        self.bare, self.full, self.composed = [], [], []

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One untimed bare forward and capture: first-call costs (kernel compilation, the
        allocator's first pages) out of every timed repeat."""
        bare_forward(self.model, self.data, self.cfg.teacher.batch_size, self.teacher.pad_id, self.device)
        self.task.capture(self.teacher, self.data, f"{self.tmp}/warm-{self.label}")

    @torch.inference_mode()
    def repeat(self, r: int) -> None:
        t0 = time.perf_counter()
        bare_forward(self.model, self.data, self.cfg.teacher.batch_size, self.teacher.pad_id, self.device)
        self.bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.task.capture(self.teacher, self.data, f"{self.tmp}/cache-{self.label}-{r}")
        self.full.append(time.perf_counter() - t0)
        if self.torch_composition and self.device.type == "cpu":  # the torch composition the row pass replaced
            pipeline.capture.represent = represent_torch
            t0 = time.perf_counter()
            self.task.capture(self.teacher, self.data, f"{self.tmp}/torch-{self.label}-{r}")
            self.composed.append(time.perf_counter() - t0)
            pipeline.capture.represent = represent

    def result(self) -> dict:
        bare, full, composed, data = self.bare, self.full, self.composed, self.data
        tokens = int(data.offsets[-1])
        rows = min(self.cfg.teacher.batch_size * self.cfg.data.seq_len, 512)  # a batch's rows (GEMM speed saturates)
        limit = matmul_gflops(teacher_matmuls(self.model), self.precision, rows)
        achieved = forward_flops(self.model, np.diff(data.offsets)) / min(full) / 1e9
        return {"precision": self.precision, "tokens": tokens, "bare_forward_s": min(bare), "stage1_s": min(full),
                "overhead_ratio": min(full) / min(bare), "tokens_per_s": tokens / min(full),
                "capture_gflops": achieved, "matmul_gflops": limit, "capture_vs_matmul": achieved / limit,
                "torch_composition_ratio": min(composed) / min(bare) if composed else None,
                "paired_ratios": [f / b for f, b in zip(full, bare, strict=True)]}


def student_step(cfg, name: str, cache: str, steps: int) -> dict:
    """Student ``name`` trained on the cache at ``cache`` as stage 3 trains it (the task's
    student run: its stream, loss and fused head; :func:`pipeline.students.fit`): a
    warm-up fit of 2 steps (kernel compiles, first allocations), then ``steps`` timed ones.
    Its FLOP/s, forward + backward (3x the forward's, over the padded batches it ran), over
    this machine's matmuls at its own linear layers in its training precision."""
    task = LanguageModel(cfg)
    data = load_tokens(cfg.data, cfg.paths.root, task.tokenizer)
    reader = open_cache(cache)
    device = choose_device(cfg.train.device)
    run = next(iter(task.student_runs(data, reader, device)))
    student = run.fits[0]
    memo = os.path.join(cfg.paths.conversions, PRECISION_MEMO)  # train.precision=auto measured once, as stage 3 does
    fit(student.model, student.stream, 2, student.loss, cfg.train, desc=f"{name}: warm-up", batches=student.batches,
        memo=memo)
    tokens = []  # each batch of the timed fit as the stream padded it: the tokens the model ran
    source = student.batches or (lambda: student.stream)

    def counted():
        for batch in source():
            tokens.append(batch.input_ids.shape)
            yield batch

    _, seconds = fit(student.model, student.stream, steps, student.loss, cfg.train, desc=f"{name}: timed",
                     batches=counted, memo=memo)
    precision = resolve_precision(cfg.train.precision.value, device, linear_shapes(student.model), memo)
    lengths = np.concatenate([np.full(b, n) for b, n in tokens])
    achieved = 3.0 * forward_flops(student.model, lengths) / seconds / 1e9
    rows = min(max(b * n for b, n in tokens), 512)
    limit = matmul_gflops(teacher_matmuls(student.model), precision, rows)
    return {"student": name, "params": sum(p.numel() for p in student.model.parameters()), "precision": precision,
            "steps": steps, "seconds": seconds, "tokens_per_s": sum(lengths) / seconds, "step_gflops": achieved,
            "matmul_gflops": limit, "step_vs_matmul": achieved / limit}


def main(overrides: list[str], repeats: int = 3, precisions: tuple[str, ...] = ("auto",),
         students: tuple[str, ...] = (), steps: int = 8) -> dict:
    register()
    tmp = tempfile.mkdtemp(prefix="bench-lm-")
    try:
        measured = {}
        for p in precisions:
            with initialize_config_module(config_module="pipeline.conf", version_base=None):
                cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=[
                    "task=lm", "data.train_size=48", "data.test_size=8", f"paths.root={tmp}",
                    f"teacher.precision={p}", *overrides])))
            measured[p] = Measured(cfg, tmp, torch_composition=p == precisions[0])
            measured[p].warm_up()
        for r in range(repeats):  # the precisions alternate, repeat by repeat
            for m in measured.values():
                m.repeat(r)
        first = measured[precisions[0]]
        trained = []
        for name in students:  # on the first precision's last cache
            with initialize_config_module(config_module="pipeline.conf", version_base=None):
                scfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=[
                    "task=lm", "data.train_size=48", "data.test_size=8", f"paths.root={tmp}",
                    f"teacher.precision={precisions[0]}", f"student={name}", "lm.variants=[topk_kl]",
                    "train.resume=false", *overrides])))
            t = student_step(scfg, name, f"{tmp}/cache-{first.label}-{repeats - 1}", steps)
            print(f"student {name} ({t['params'] / 1e6:.1f}M parameters, {t['precision']}): {t['steps']} steps in "
                  f"{t['seconds']:.2f}s ({t['tokens_per_s']:.0f} tokens/s), forward + backward {t['step_gflops']:.1f} "
                  f"GFLOP/s = x{t['step_vs_matmul']:.3f} this machine's matmuls at its shapes "
                  f"({t['matmul_gflops']:.1f} G)", flush=True)
            trained.append(t)
        runs = {}
        for p, m in measured.items():
            runs[p] = r = m.result()
            print(f"teacher.precision={p} ({r['precision']}): bare forward {r['bare_forward_s']:.2f}s  stage 1 "
                  f"{r['stage1_s']:.2f}s  overhead x{r['overhead_ratio']:.3f} ({r['tokens_per_s']:.0f} tokens/s); "
                  f"the capture's teacher FLOP/s {r['capture_gflops']:.1f} G = x{r['capture_vs_matmul']:.3f} this "
                  f"machine's matmuls at the teacher's shapes ({r['matmul_gflops']:.1f} G)"
                  + (f"; torch composition instead of the fused row pass x{r['torch_composition_ratio']:.3f}"
                     if r["torch_composition_ratio"] else ""), flush=True)
            print("  each repeat: " + "  ".join(f"x{x:.3f}" for x in r["paired_ratios"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = runs[precisions[0]]
    res = {**first, "machine": machine(), "device": str(choose_device(cfg.teacher.device)),
           "modes": sorted(m.value for m in cfg.cache.modes), "k": cfg.cache.k, "samples": cfg.cache.samples}
    if trained:
        res["students"] = trained
        res |= {f"step_vs_matmul_{t['student']}": t["step_vs_matmul"] for t in trained}
    if len(runs) > 1:  # the default against the fastest explicit precision, same run
        fastest = min((r["stage1_s"] for p, r in runs.items() if p != "auto"), default=None)
        res["precisions"] = runs
        if "auto" in runs and fastest:
            res["auto_vs_fastest"] = runs["auto"]["stage1_s"] / fastest
            print(f"auto's stage 1 over the fastest explicit precision's: x{res['auto_vs_fastest']:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="auto", help="teacher precisions, each measured in turn: auto,fp32,bf16")
    ap.add_argument("--students", default="causal_lm,teacher_layers",
                    help="students whose training step is measured on the cache ('' for none)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per student")
    args, overrides = ap.parse_known_args()
    main(overrides, args.repeats, tuple(args.precisions.split(",")), tuple(filter(None, args.students.split(","))),
         args.steps)
