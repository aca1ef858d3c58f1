"""Stage 1 and the losses on a CUDA device, checked against the CPU path in one run.

    python bench/cuda_check.py [--root DIR] [--rows 20000]

On a machine with CUDA: captures the same rows with the same teacher on the CPU, on CUDA
in fp32 and on CUDA under bf16 autocast; checks the host buffers are pinned, the caches
verify, and the CUDA logits match the CPU's (fp32 to float16 rounding, bf16 by argmax
agreement and max error); then checks every distance's torch path on CUDA against the
Numba kernels on the CPU (values and gradients); then times the task=lm capture (top-K +
logsumexp + sampled rows over a 49,152-token vocabulary) against the bare forward on the
same Shakespeare sequences, in bf16 and fp32, for randomly initialised causal LMs of
SmolLM2-135M's shape and of a ~1B shape (built from a config: weights do not change the
speed, and nothing is downloaded). Without CUDA it says so and exits 0 (``--device cpu
--lm-shapes tiny`` dry-runs every path here). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pipeline.cache import open_cache
from pipeline.capture import host_buffers
from pipeline.config import register
from pipeline.losses import distance_loss, sampled_kl_loss, topk_kl_loss
from pipeline.representations import sample_counts
from pipeline.tasks import validate
from pipeline.tasks.classify import Classify, obtain_teacher
from pipeline.tasks.classify.data import load_splits

LM_SHAPES = {  # LlamaConfig fields; vocabulary 49,152 (SmolLM2's tokenizer) for all
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def config(root: str, rows: int, device: str, precision: str):
    with initialize_config_module(config_module="pipeline.conf", version_base=None):
        return validate(OmegaConf.to_object(compose(config_name="config", overrides=[
            f"paths.root={root}", f"data.transfer_size={rows}", f"teacher.device={device}",
            f"teacher.precision={precision}", "cache.modes=[full,topk,sampled]", "cache.k=4"])))


def capture(root: str, rows: int, device: str, precision: str) -> tuple[np.ndarray, dict, float]:
    cfg = config(root, rows, device, precision)
    splits = load_splits(cfg.data, root)
    teacher, _ = obtain_teacher(cfg, splits, root)
    url = f"{root}/cache-{len(os.listdir(root))}-{device}-{precision}"
    t0 = time.perf_counter()
    Classify(cfg).capture(teacher, splits, url)
    took = time.perf_counter() - t0
    reader = open_cache(url)
    reader.verify()
    info = {"pinned": None}
    if device == "cuda":
        m, _ = Classify(cfg).plan(teacher.to(device), splits)
        info["pinned"] = all(b.is_pinned() for b in host_buffers(m, 8, torch.device(device)).values())
    return reader.logits.compute().astype(np.float32), info, took


def check_losses(device: str) -> dict:
    """The torch path on CUDA against the Numba kernels on the CPU, values and gradients."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(512, 1000, generator=g) * 3
    t = torch.randn(512, 1000, generator=g) * 3
    val, idx = torch.topk(t, 16, dim=1)  # a wide vocabulary: 1000 columns
    counts_idx, counts = sample_counts(t, 16, 2.0, torch.Generator().manual_seed(1))
    logp = torch.log_softmax(t / 2, 1)
    cases = {name: (lambda x, tt, name=name: distance_loss(name, x, tt, temperature=2.0), (t,))
             for name in ("kl", "reverse_kl", "js", "mse", "cosine", "euclidean")}
    cases["topk_kl"] = (lambda x, *a: topk_kl_loss(x, *a, temperature=2.0),
                        (idx.int(), val.half(), torch.logsumexp(t / 2, 1)))
    cases["sampled_kl"] = (lambda x, *a: sampled_kl_loss(x, *a, temperature=2.0),
                           (counts_idx, counts, -(logp.exp() * logp).sum(1)))
    return {name: compare(fn, s, args, device) for name, (fn, args) in cases.items()}


def compare(fn, s: torch.Tensor, args: tuple, device: str) -> dict:
    """``fn`` on the CPU (Numba kernels) and on ``device``: loss and gradient differences."""
    vals, grads = [], []
    for dev in ("cpu", device):
        x = s.to(dev, copy=True).requires_grad_()  # a leaf on each device
        loss = fn(x, *[a.to(dev) for a in args])
        loss.backward()
        vals.append(loss.item())
        grads.append(x.grad.cpu())
    return {"value_rel_err": abs(vals[0] - vals[1]) / max(abs(vals[0]), 1e-12),
            "grad_max_err": (grads[0] - grads[1]).abs().max().item()}


def check_lm_capture(root: str, device: str, shapes: list[str], sequences: int) -> dict:
    """tokens/s of the bare forward and of the whole capture, and their ratio, per shape and precision."""
    from lm_capture import bare_forward  # bench/ is the script's folder
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tasks.lm import LanguageModel
    from pipeline.tasks.lm.models import LMTeacher, load_tokenizer
    from pipeline.tasks.lm.text import load_tokens

    out = {}
    for shape in shapes:
        for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            with initialize_config_module(config_module="pipeline.conf", version_base=None):
                cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=[
                    "task=lm", f"paths.root={root}", f"data.train_size={sequences}", "data.test_size=8",
                    f"teacher.device={device}", f"teacher.precision={precision}"])))
            tokenizer = load_tokenizer(cfg.teacher, cfg.paths.conversions)
            data = load_tokens(cfg.data, root, tokenizer)
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, **LM_SHAPES[shape])).to(device, dtype).eval()
            teacher = LMTeacher(model, tokenizer, {"name": f"random-{shape}", "precision": precision})
            dev = torch.device(device)
            bare_forward(model, data, cfg.teacher.batch_size, teacher.pad_id, dev)  # warm-up (kernels, allocator)
            t0 = time.perf_counter()
            bare_forward(model, data, cfg.teacher.batch_size, teacher.pad_id, dev)
            bare = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = LanguageModel(cfg).capture(teacher, data, f"{root}/lm-{shape}-{precision}")
            full = time.perf_counter() - t0
            tokens = int(data.offsets[-1])
            out[f"{shape}/{precision}"] = {
                "params": sum(p.numel() for p in model.parameters()), "tokens": tokens, "complete": m.complete,
                "bare_tokens_per_s": tokens / bare, "capture_tokens_per_s": tokens / full,
                "overhead_ratio": full / bare,
                "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
            print(shape, precision, json.dumps(out[f"{shape}/{precision}"]), flush=True)
            del model, teacher
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--device", default="cuda", help="cpu runs the same checks CPU against CPU (a dry run)")
    ap.add_argument("--lm-shapes", default="smollm2-135m,llama-1b", help=f"of {sorted(LM_SHAPES)}, comma-separated")
    ap.add_argument("--lm-sequences", type=int, default=256, help="sequences of 128 tokens captured per shape")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "note": "no CUDA device here; nothing checked"}))
        return
    register()
    root = args.root or tempfile.mkdtemp(prefix="cuda-check-")
    cpu, _, t_cpu = capture(root, args.rows, "cpu", "fp32")
    f32, info, t_f32 = capture(root, args.rows, args.device, "fp32")
    b16, _, t_b16 = capture(root, args.rows, args.device, "bf16")
    res = {
        "cuda": args.device == "cuda", "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "torch": torch.__version__, "rows": len(cpu),
        "pinned_host_buffers": info["pinned"],
        "capture_s": {"cpu_fp32": t_cpu, "device_fp32": t_f32, "device_bf16": t_b16},
        "fp32_max_abs_err_vs_cpu": float(np.abs(f32 - cpu).max()),
        "fp32_argmax_agree": float((f32.argmax(1) == cpu.argmax(1)).mean()),
        "bf16_max_abs_err_vs_cpu": float(np.abs(b16 - cpu).max()),
        "bf16_argmax_agree": float((b16.argmax(1) == cpu.argmax(1)).mean()),
        "losses_cuda_vs_cpu": check_losses(args.device),
        "lm_capture": check_lm_capture(root, args.device, args.lm_shapes.split(","), args.lm_sequences),
    }
    print(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
