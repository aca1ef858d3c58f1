"""The on-disk cache format: array names, the manifest schema and its version.

A cache is a folder (local or fsspec URL) holding ``manifest.json`` and the arrays of
one or more *representations* of the teacher's output, stored beside the index: a Zarr v3
group in ``zarr/`` (``zarr.open_group("<cache>/zarr")`` opens it, no warnings) or Arrow
IPC files in ``shards/``:

| mode      | arrays (rows are samples or tokens)                                          |
|-----------|------------------------------------------------------------------------------|
| (always)  | ``ids`` (N,) int64: the dataset row each cached row belongs to               |
| ``full``  | ``logits`` (N, C) in the cache dtype                                         |
| ``topk``  | ``topk_idx`` (N, K) int32, ``topk_val`` (N, K) cache dtype: the K largest    |
|           | logits; ``lse`` (N, M) float32: the exact logsumexp of the whole row of      |
|           | logits/T at each of the M capture temperatures (so the tail mass is known)   |
| (sequences) | ``offsets.npy`` (S+1,) int64 beside the manifest, its sha256 in it:      |
|           | sequence i owns rows offsets[i]:offsets[i+1]; ``positions.npy`` (N,) int32  |
|           | when the rows are some of the sequence's tokens (chat: assistant tokens),   |
|           | row r is at token positions[r] of its sequence (absent: every token, in order)|
| ``sampled`` | ``sampled_idx`` (N, S) int32 distinct class ids drawn from softmax(t/Ts),  |
|           | padded with -1; ``sampled_cnt`` (N, S) uint16 how often each was drawn (0 =  |
|           | padding); ``sampled_ent`` (N,) float32 the teacher's entropy at Ts;          |
|           | without ``full`` or ``topk`` also ``top1`` (N,) int32: the teacher's argmax, |
|           | so its accuracy and agreement are exact on a sampled-only cache              |

An adaptive top-k cache (manifest ``top_p`` > 0) cuts each row after the smallest prefix
of its top-K whose probability at the first capture temperature reaches ``top_p``: the
entries after it are padding, ``topk_idx`` -1 and ``topk_val`` -inf (probability 0). Rows
stay K wide, so shards, chunks and readers are those of any top-k cache; ``topk_val`` is
zstd-compressed too, which stores the padding in next to nothing.

A ``narrow`` cache (manifest field) stores the int32 id arrays as uint16 (65,535 = the -1
padding) and ``sampled_cnt`` as uint8; readers widen them back (:mod:`pipeline.cache.decode`).
With ``value_bits`` 8 or 4, ``topk_val`` (N, K) uint8 (N, ceil(K/2) at 4 bits, two codes per
byte, even entries in the low half) holds codes below each row's largest logit, and
``topk_q`` (N, 2) float32 that largest value and the step: value = largest - code * step, the
top code -inf; readers decode them (:mod:`pipeline.cache.decode`).

``kdcache.json`` is written first, into an empty or new folder, and never changed: it marks
the folder as a cache of this project (stage 1 writes nowhere else) and holds the plan (the
manifest as created: fingerprint, layout, shard ranges), so a damaged ``manifest.json`` is
rebuilt from it and the commit records instead of starting over.

The manifest is the index: every shard with its row range, status and checksum, and
``complete: true`` only after the last shard is committed, so an interrupted capture is
visibly incomplete. It carries a checksum of its own content, so an edit is detected, and
is always replaced whole (see :mod:`pipeline.cache.storage`). While a capture runs, each
shard, once whole, gets a commit record of its own under ``commits/`` (one writer per
shard, so concurrent workers never write the same file); the last worker to finish folds
them into the manifest and marks it complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pipeline.cache.storage import Storage
from pipeline.errors import CacheError, CacheNotFound, ConfigError

FORMAT_VERSION = 7  # 2: kdcache.json, per-object sizes in commit records, top1 on sampled-only caches;
# 3: the Zarr group in zarr/ beside the index; one fingerprint schema for every task;
# 4: positions.npy, sequence caches with rows at some of their tokens only;
# 5: tokenizer.json, the teacher tokenizer (each token's bytes: its span in the text);
# 6: draws by the inverse CDF at sorted uniforms (the fused CPU row pass and the torch path
#    alike), top-K ties by lower id, adaptive top-k rows (top_p);
# 7: the manifest's ``task`` fields and the ``task/`` folder, which the format carries for the
#    capturing task without reading them (task=lm's vocabulary and teacher evaluation)
MANIFEST = "manifest.json"
MARKER = "kdcache.json"  # written first, never changed: "this folder is a cache" + its plan
OFFSETS = "offsets.npy"  # sequence tasks: sequence i owns rows offsets[i]:offsets[i + 1]
POSITIONS = "positions.npy"  # sequence rows at some tokens only: row r is at token positions[r] of its sequence
# token caches: the teacher's tokenizer (Hugging Face ``tokenizers`` JSON). A byte-level one
# gives every token id its bytes, so each cached token's byte span in the sequence's text is
# the running sum of its tokens' byte lengths: what aligns students with other tokenizers.
TOKENIZER = "tokenizer.json"
INDEX_DIGESTS = {OFFSETS: "offsets_sha256", POSITIONS: "positions_sha256",  # index file -> its manifest field
                 TOKENIZER: "tokenizer_sha256"}
COMMITS = "commits"  # one small record per committed shard, written after the shard itself
TASK_FILES = "task"  # the capturing task's own files beside the cache: carried (derived caches too), never read
GROUP = "zarr"  # the Zarr backend's group, beside the index files
IDS, LOGITS = "ids", "logits"
TOPK_IDX, TOPK_VAL, LSE = "topk_idx", "topk_val", "lse"
# quantized top-k values (manifest ``value_bits`` 8 or 4): ``topk_val`` holds codes, this
# (N, 2) float32 array each row's largest logit and the step between codes
TOPK_Q = "topk_q"
SAMPLED_IDX, SAMPLED_CNT, SAMPLED_ENT = "sampled_idx", "sampled_cnt", "sampled_ent"
TOP1 = "top1"
ARRAYS = (IDS, LOGITS, TOPK_IDX, TOPK_VAL, TOPK_Q, LSE, SAMPLED_IDX, SAMPLED_CNT, SAMPLED_ENT, TOP1)
# Every top-level entry a cache folder can hold: what `cache.overwrite=true` may delete
# (``locks/`` is kept; anything else, a user's file, is never touched).
CACHE_ENTRIES = {MARKER, MANIFEST, OFFSETS, POSITIONS, TOKENIZER, COMMITS, GROUP, "shards", TASK_FILES,
                 "teacher_eval.json",  # (where version 6 kept task=lm's teacher evaluation)
                 "zarr.json", *ARRAYS}  # (the last two: where version 2 kept its arrays)
DTYPES = ("float16", "bfloat16", "float32")
# bfloat16 has no NumPy dtype: it is stored as its raw uint16 bit pattern.
STORAGE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
ITEMSIZE = {"int64": 8, "int32": 4, "uint16": 2, "uint8": 1, "float16": 2, "float32": 4}
# ``narrow`` caches store class ids as uint16 (at most 65,535 classes; NARROW_PAD stands for the
# -1 padding of sampled ids) and draw counts as uint8 (at most 255 draws); readers see int32
# ids and uint16 counts either way (pipeline/cache/decode.py)
NARROW_PAD = 65535


# What every message about a damaged cache tells the user to do (stage 1 heals: it checks
# each committed shard, re-captures the damaged ones and keeps the rest).
REPAIR = ("run stage 1 again with the same config and verify=true (`python -m pipeline.run stage=1 verify=true "
          "...`; for a derived cache, the stage-2 derive command that made it, with verify=true): it re-captures "
          "damaged or missing shards and keeps the healthy ones")


class CacheDamaged(CacheError):
    """A shard whose stored bytes are missing, cut or do not match their checksums."""

    def __init__(self, url: str, array: str, obj: str, rows: tuple[int, int], what: str):
        super().__init__(f"cache {url!r}: array {array!r}, object {obj!r} (rows {rows[0]}:{rows[1]}): {what}. "
                         f"The cache is damaged: {REPAIR}")
        self.array, self.object, self.rows = array, obj, rows


@dataclass
class ShardRecord:
    index: int
    start: int
    stop: int
    status: str = "pending"  # pending | committed
    sha256: str | None = None
    nbytes: dict[str, int] | None = None  # committed: size of each stored object, checked cheaply

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Manifest:
    backend: str
    modes: list[str]
    dtype: str
    num_classes: int
    rows: int
    chunk_rows: int
    shard_rows: int
    splits: dict[str, list[int]]  # split name -> [start, stop) row range
    fingerprint: dict
    k: int = 0
    samples: int = 0
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    sample_temperature: float = 1.0
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    compression: str = "ints"  # all | ints | none: which arrays carry zstd
    narrow: bool = False  # ids uint16, counts uint8 (see NARROW_PAD)
    value_bits: int = 16  # topk_val: 16 = in the cache dtype; 8 or 4 = quantized (see TOPK_Q and pipeline/cache/decode.py)
    # adaptive top-k: each row keeps its smallest prefix of the top-K whose probability at
    # temperatures[0] reaches top_p, the rest padding (id -1, value -inf; 0 = every row keeps K)
    top_p: float = 0.0
    format_version: int = FORMAT_VERSION
    info: dict = field(default_factory=dict)  # free-form: teacher accuracy, timings
    # sequence tasks (rows are tokens): the number of sequences, the sha256 of the (S + 1,)
    # int64 ``offsets`` array stored beside the manifest (OFFSETS), of the (N,) int32
    # ``positions`` when rows are some tokens only (POSITIONS; "" when every token has a row),
    # of the teacher's ``tokenizer.json`` (TOKENIZER; "" where none was recorded)
    sequences: int = 0
    offsets_sha256: str = ""
    positions_sha256: str = ""
    tokenizer_sha256: str = ""
    # the capturing task's own fields (JSON), part of the plan, carried without being read here
    # (task=lm: {"vocab": {"logit_width": ..., "tokenizer_size": ...}}); its files: TASK_FILES
    task: dict = field(default_factory=dict)

    def missing_shards(self) -> list[int]:
        return [s.index for s in self.shards if s.status != "committed"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["shards"] = [ShardRecord(**s) for s in d.get("shards", [])]
        return cls(**d)


Specs = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape of one row, storage dtype)


@dataclass(frozen=True)
class Representation:
    """One way a cache holds the teacher's rows (a manifest ``mode``): the arrays the
    distances read, in the order their kernels take them, and ``specs(m)``: every array it
    stores for manifest ``m``, each row's shape and storage dtype. How each is made from
    logits: :mod:`pipeline.representations`; read back: :mod:`pipeline.cache.decode`."""

    name: str
    arrays: tuple[str, ...]
    specs: Callable[[Manifest], Specs]
    # the parent representations stage 2 derives it from, the first one a parent holds
    # (:func:`pipeline.derive.derive_source` checks that parent's rows suffice)
    sources: tuple[str, ...] = ()


def _ids(m: Manifest) -> str:
    return "uint16" if m.narrow else "int32"


def _topk_specs(m: Manifest) -> Specs:
    specs = {TOPK_IDX: ((m.k,), _ids(m)), TOPK_VAL: ((m.k,), STORAGE_DTYPE[m.dtype]),
             LSE: ((len(m.temperatures),), "float32")}
    if m.value_bits < 16:  # codes, two 4-bit ones per byte at 4 bits
        specs |= {TOPK_VAL: ((m.k if m.value_bits == 8 else (m.k + 1) // 2,), "uint8"), TOPK_Q: ((2,), "float32")}
    return specs


def _sampled_specs(m: Manifest) -> Specs:
    specs = {SAMPLED_IDX: ((m.samples,), _ids(m)), SAMPLED_CNT: ((m.samples,), "uint8" if m.narrow else "uint16"),
             SAMPLED_ENT: ((), "float32")}
    if not {"full", "topk"} & set(m.modes):  # the argmax is not otherwise known exactly
        specs[TOP1] = ((), _ids(m))
    return specs


REPRESENTATIONS = {r.name: r for r in (
    Representation("full", (LOGITS,), lambda m: {LOGITS: ((m.num_classes,), STORAGE_DTYPE[m.dtype])}, ("full",)),
    Representation("topk", (TOPK_IDX, TOPK_VAL, LSE), _topk_specs, ("full", "topk")),
    Representation("sampled", (SAMPLED_IDX, SAMPLED_CNT, SAMPLED_ENT), _sampled_specs, ("sampled",)),
)}
MODES = tuple(REPRESENTATIONS)


def array_specs(m: Manifest) -> Specs:
    """Every array of a cache: name -> (shape of one row, storage dtype)."""
    specs: Specs = {IDS: ((), "int64")}
    for mode in MODES:
        if mode in m.modes:
            specs |= REPRESENTATIONS[mode].specs(m)
    return specs


def check_narrow(num_classes: int, samples: int, section: str) -> None:
    """Refuse ``<section>.narrow=true`` where the narrow dtypes cannot hold the ids or counts."""
    if num_classes > NARROW_PAD:
        raise ConfigError(f"{section}.narrow=true stores class ids as uint16, which holds {NARROW_PAD} classes; the "
                         f"teacher has {num_classes}: set {section}.narrow=false")
    if samples > 255:
        raise ConfigError(f"{section}.narrow=true stores draw counts as uint8; {section}.samples={samples} can reach "
                         f"more than 255: lower {section}.samples or set {section}.narrow=false")


def check_top_p(top_p: float, modes, section: str) -> float:
    """``<section>.top_p``: 0 (off) or a mass in (0, 1) for an adaptive top-k (``modes``
    None: the range alone, before the representations are known)."""
    top_p = float(top_p or 0.0)
    if top_p and not 0.0 < top_p < 1.0:
        raise ConfigError(f"{section}.top_p={top_p}: the probability mass each adaptive top-k row keeps, in (0, 1) "
                         "(0.9: stop at the fewest entries holding 90%); 0 keeps all K")
    if top_p and modes is not None and "topk" not in modes:
        raise ConfigError(f"{section}.top_p={top_p} cuts top-k rows; the {section} holds {list(modes)}: add topk")
    return top_p


def check_value_bits(bits: int, modes, section: str) -> int:
    """``<section>.value_bits``: 16 (top-k values in the cache dtype), 8 or 4 (quantized),
    the last two for a top-k representation (``modes`` None: the value alone)."""
    if bits not in (16, 8, 4):
        raise ConfigError(f"{section}.value_bits={bits}: 16 (values in {section}.dtype), 8 or 4 (quantized top-k "
                          "values)")
    if bits < 16 and modes is not None and "topk" not in modes:
        raise ConfigError(f"{section}.value_bits={bits} quantizes top-k values; the {section} holds {list(modes)}: "
                          f"set {section}.value_bits=16 or add topk")
    return bits


def row_bytes(m: Manifest, modes: tuple[str, ...] | None = None) -> int:
    """Uncompressed bytes per cached row, over ``modes`` (default: the manifest's)."""
    sub = Manifest(**{**asdict(m), "modes": list(modes or m.modes), "shards": []})
    total = 0
    for name, (shape, dtype) in array_specs(sub).items():
        if name != IDS:
            total += ITEMSIZE[dtype] * (shape[0] if shape else 1)
    return total


def task_file(name: str) -> str:
    """Where the capturing task keeps its file ``name`` in the cache (under TASK_FILES)."""
    return f"{TASK_FILES}/{name}"


def plan_shards(rows: int, shard_rows: int) -> list[ShardRecord]:
    return [ShardRecord(i, start, min(start + shard_rows, rows))
            for i, start in enumerate(range(0, rows, shard_rows))]


def _body_hash(raw: dict) -> str:
    body = {k: v for k, v in raw.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(storage: Storage, manifest: Manifest, name: str = MANIFEST) -> None:
    """Replace ``manifest.json`` (or the plan, ``name=MARKER``) whole, with a checksum of its own content."""
    raw = asdict(manifest)
    raw["checksum"] = _body_hash(raw)
    storage.write_atomic(json.dumps(raw, indent=2).encode(), name)


def identify(storage: Storage, name: str) -> tuple[bool, Manifest | None, str]:
    """Is ``name`` (the manifest or the plan) one of ours, is it usable, and why not:
    (written by this project: it matches its own checksum, whatever its version;
    the manifest when readable with this version; the reason when it is not)."""
    try:
        raw = json.loads(storage.read_bytes(name))
    except FileNotFoundError:
        return False, None, f"{name} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return False, None, f"{name} is not valid JSON ({e})"
    if not isinstance(raw, dict) or raw.get("checksum") != _body_hash(raw):
        return False, None, f"{name} does not match its own checksum"
    try:
        return True, read_manifest(storage, name), ""
    except ValueError as e:
        return True, None, str(e)


def read_manifest(storage: Storage, name: str = MANIFEST) -> Manifest:
    """The manifest (or the plan, ``name=MARKER``), checked: its own checksum, the version."""
    if not storage.exists(name):
        raise CacheNotFound(f"no cache at {storage.url!r}: {name} is missing "
                                "(run stage 1 first, or point cache.path at an existing cache)")
    try:
        raw = json.loads(storage.read_bytes(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{storage.url}/{name} is not valid JSON ({e}); the cache index is damaged: "
                         f"{REPAIR}") from e
    if not isinstance(raw, dict) or "checksum" not in raw or raw["checksum"] != _body_hash(raw):
        raise CacheError(f"{storage.url}/{name} does not match its own checksum: it was edited or damaged. "
                         f"{REPAIR} (it rebuilds the index and keeps every healthy committed shard)")
    raw.pop("checksum")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"cache {storage.url!r} has format_version={version!r}; this code reads "
                         f"version {FORMAT_VERSION}: re-capture it with this version of stage 1")
    try:
        return Manifest.from_dict(raw)
    except TypeError as e:
        raise CacheError(f"{storage.url}/{MANIFEST} does not match the manifest schema of version "
                         f"{FORMAT_VERSION}: {e}") from e


@dataclass
class SequenceIndex:
    """Where a sequence cache's rows are: sequence i owns rows ``offsets[i]:offsets[i + 1]``;
    with ``positions``, row r is at token ``positions[r]`` of its sequence (a chat cache
    holds assistant tokens only), without, the rows are every token of the sequence in order.
    ``tokenizer``: the teacher tokenizer's JSON, from which each token's byte span follows."""

    offsets: object  # (S + 1,) int64
    positions: object = None  # (N,) int32, or None
    tokenizer: bytes | None = None

    @functools.cached_property
    def files(self) -> dict[str, tuple[bytes, str]]:
        """file name -> (its bytes, the manifest field that holds its sha256), serialized once."""
        out = {OFFSETS: (_npy_bytes(self.offsets, "int64"), INDEX_DIGESTS[OFFSETS])}
        if self.positions is not None:
            out[POSITIONS] = (_npy_bytes(self.positions, "int32"), INDEX_DIGESTS[POSITIONS])
        if self.tokenizer is not None:
            out[TOKENIZER] = (self.tokenizer, INDEX_DIGESTS[TOKENIZER])
        return out

    def describe(self, m: Manifest) -> None:
        """Record the index in a new manifest (its size and digests)."""
        m.sequences = len(self.offsets) - 1
        for data, field_name in self.files.values():
            setattr(m, field_name, hashlib.sha256(data).hexdigest())

    def matches(self, m: Manifest) -> bool:
        files = self.files
        return (m.sequences == len(self.offsets) - 1 and bool(m.positions_sha256) == (POSITIONS in files)
                and bool(m.tokenizer_sha256) == (TOKENIZER in files) and all(hashlib.sha256(d).hexdigest() == getattr(m, f) for d, f in files.values()))


def _npy_bytes(a, dtype: str) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def write_index(storage: Storage, index: SequenceIndex, only_damaged: bool = False) -> list[str]:
    """Write the index files (before the manifest that names their digests); with
    ``only_damaged``, just those missing or not matching their bytes. Returns the files written."""
    written = []
    for name, (data, _) in index.files.items():
        if only_damaged and storage.exists(name) and storage.read_bytes(name) == data:
            continue
        storage.write_atomic(data, name)
        written.append(name)
    return written


def read_index_file(storage: Storage, m: Manifest, name: str, raw: bool = False):
    """One index file of a sequence cache, checked against its digest in the manifest (an
    array; with ``raw``, its bytes)."""
    import io

    import numpy as np

    digest = getattr(m, INDEX_DIGESTS[name])
    if not storage.exists(name):
        raise CacheError(f"cache {storage.url!r} holds {m.sequences} sequences but no {name}; {REPAIR}")
    data = storage.read_bytes(name)
    if hashlib.sha256(data).hexdigest() != digest:
        raise CacheError(f"cache {storage.url!r}: {name} does not match its digest in the manifest; "
                         f"the cache is damaged: {REPAIR}")
    return data if raw else np.load(io.BytesIO(data), allow_pickle=False)
