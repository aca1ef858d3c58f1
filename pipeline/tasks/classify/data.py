"""Dataset loading: the built-in MNIST-1D default and any dataset on disk.

Every source ends as a :class:`Splits` of NumPy arrays in a fixed order,
``transfer, train, test``: the order in which stage 1 caches them, so a cached row's
``id`` is its position in that concatenation (the manifest records each split's range).
``transfer`` holds unlabeled samples (labels -1); it may be empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import ClassifyDataConfig, DataSource
from pipeline.errors import DataError, DataNotFound
from pipeline.hashing import hash_json
from pipeline.tasks.base import save_dataset_atomic

log = logging.getLogger(__name__)

SPLITS = ("transfer", "train", "test")
UNLABELED = -1


@dataclass
class Split:
    name: str
    x: np.ndarray  # (N, L) float32
    y: np.ndarray  # (N,) int64, UNLABELED where unknown

    @property
    def labeled(self) -> bool:
        return bool(len(self.y)) and bool((self.y != UNLABELED).all())


@dataclass
class Splits:
    splits: dict[str, Split]
    num_classes: int

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Row range of each split in the concatenated ``transfer, train, test`` order."""
        out, start = {}, 0
        for name in SPLITS:
            n = len(self.splits[name].y)
            out[name] = (start, start + n)
            start += n
        return out

    def concat(self) -> tuple[np.ndarray, np.ndarray]:
        """All inputs and labels in id order: ``x[ids]`` joins a cached row to its sample."""
        xs = np.concatenate([self.splits[s].x for s in SPLITS])
        ys = np.concatenate([self.splits[s].y for s in SPLITS])
        return xs, ys

    def content_hash(self) -> str:
        """sha256 over the rows actually loaded (inputs and labels, every split)."""
        h = hashlib.sha256()
        for name in SPLITS:
            s = self.splits[name]
            for arr in (s.x, s.y):
                h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def load_splits(cfg: ClassifyDataConfig, root: str) -> Splits:
    if cfg.source is DataSource.mnist1d:
        path = os.path.join(root, "datasets", f"mnist1d-{_config_key(cfg)}")
        if not os.path.exists(os.path.join(path, "dataset_dict.json")):
            save_dataset_atomic(make_mnist1d(cfg), path)
        return _from_dataset_dict(_load_from_disk(path), cfg)
    return _from_dataset_dict(_load_user_dataset(cfg), cfg)


def _config_key(cfg: ClassifyDataConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k in
              ("train_size", "transfer_size", "test_size", "seed", "transfer_seed")}
    return hash_json(fields)[:10]


def make_mnist1d(cfg: ClassifyDataConfig):
    """Generate MNIST-1D locally (never ``get_dataset``, which downloads)."""
    import datasets
    from mnist1d.data import get_dataset_args, make_dataset

    log.info("generating MNIST-1D: train=%d test=%d (seed %d), transfer=%d (seed %d)",
             cfg.train_size, cfg.test_size, cfg.seed, cfg.transfer_size, cfg.transfer_seed)
    x, y = _mnist1d_rows(make_dataset, get_dataset_args, cfg.train_size + cfg.test_size, cfg.seed)
    xt, _ = _mnist1d_rows(make_dataset, get_dataset_args, cfg.transfer_size, cfg.transfer_seed)
    n = cfg.train_size
    return datasets.DatasetDict({
        "train": _to_dataset(x[:n], y[:n]),
        "test": _to_dataset(x[n:], y[n:]),
        "transfer": _to_dataset(xt, None),
    })


def _mnist1d_rows(make_dataset, get_dataset_args, n: int, seed: int):
    if n == 0:
        return np.zeros((0, 40), np.float32), np.zeros((0,), np.int64)
    args = get_dataset_args()
    args.num_samples = -(-n // 10) * 10  # make_dataset draws num_samples // 10 per class
    args.train_split = 1.0
    args.seed = seed
    d = make_dataset(args)
    return d["x"][:n].astype(np.float32), d["y"][:n].astype(np.int64)


def _to_dataset(x: np.ndarray, y: np.ndarray | None):
    """An HF dataset straight from Arrow buffers (no Python list of rows: 1M rows in seconds)."""
    import datasets
    import pyarrow as pa

    cols = {"x": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), x.shape[1])}
    feats = {"x": datasets.Sequence(datasets.Value("float32"), length=x.shape[1])}
    if y is not None:
        cols["y"] = pa.array(y)
        feats["y"] = datasets.Value("int64")
    return datasets.Dataset(pa.table(cols), info=datasets.DatasetInfo(features=datasets.Features(feats)))


def _load_from_disk(path: str):
    import datasets

    try:
        return datasets.load_from_disk(path)
    except (IndexError, ValueError, KeyError) as e:  # datasets cannot load an empty saved split
        empty = [name for name in SPLITS if _saved_split_is_empty(os.path.join(path, name))]
        if empty:
            raise DataError(f"data.path={path!r}: split(s) {empty} were saved with no rows, and datasets cannot "
                             "load an empty saved split; give them rows, or leave the split out (train and test "
                             "are required, transfer is optional)") from e
        raise DataError(f"data.path={path!r} cannot be loaded with datasets.load_from_disk: "
                         f"{type(e).__name__}: {e}") from e


def _saved_split_is_empty(folder: str) -> bool:
    state = os.path.join(folder, "state.json")
    if not os.path.exists(state):
        return False
    with open(state) as f:
        return not json.load(f).get("_data_files")


def _load_user_dataset(cfg: ClassifyDataConfig):
    import datasets

    path = cfg.path
    if not path or not os.path.exists(path):
        raise DataNotFound(f"data.path={path!r} does not exist; point it at a save_to_disk folder "
                                "or a folder of {split}.parquet / {split}.arrow files")
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        return _load_from_disk(path)
    found = {}
    for split in SPLITS:
        for ext, reader in (("parquet", datasets.Dataset.from_parquet), ("arrow", datasets.Dataset.from_file)):
            f = os.path.join(path, f"{split}.{ext}")
            if os.path.exists(f):
                if ext == "parquet" and _parquet_rows(f) == 0:  # datasets fails on these, naming nothing
                    if split == "transfer":
                        continue  # an empty transfer split is the same as none
                    raise DataError(f"split {split!r} of {path} has no rows ({f}): train and test need at "
                                     "least one each")
                try:
                    found[split] = reader(f)
                except Exception as e:  # datasets' own errors name neither the file nor the split
                    raise DataError(f"data.path: {f} (the {split} split) cannot be read as .{ext}: "
                                     f"{type(e).__name__}: {e}") from e
    if not found:
        raise DataNotFound(f"data.path={path!r} holds no dataset_dict.json and no "
                                "train/test/transfer .parquet or .arrow files")
    return datasets.DatasetDict(found)


def _parquet_rows(path: str) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - unreadable: the reader below says why
        return None


def _from_dataset_dict(dsd, cfg: ClassifyDataConfig) -> Splits:
    missing = [s for s in ("train", "test") if s not in dsd]
    if missing:
        raise DataError(f"dataset at {cfg.path or 'the mnist1d folder'} has splits {list(dsd)}; "
                         f"missing {missing} (train and test are required, transfer is optional)")
    out = {name: _split_arrays(dsd[name], name, cfg) for name in SPLITS if name in dsd}
    width = out["train"].x.shape[1]
    out.setdefault("transfer", Split("transfer", np.zeros((0, width), np.float32), np.zeros((0,), np.int64)))
    widths = {name: s.x.shape[1] for name, s in out.items() if len(s.y)}
    if len(set(widths.values())) > 1:
        raise DataError(f"input width differs between splits: {widths}")
    return Splits({name: out[name] for name in SPLITS}, cfg.num_classes)


def _split_arrays(ds, name: str, cfg: ClassifyDataConfig) -> Split:
    if len(ds) == 0 and name != "transfer":
        raise DataError(f"split {name!r} of {cfg.path or 'the dataset'} has no rows: train and test need at "
                         "least one each")
    if cfg.input_column not in ds.column_names:
        raise DataError(f"split {name!r} has no input column {cfg.input_column!r}; columns are "
                         f"{ds.column_names}: set data.input_column")
    x = _column(ds, cfg.input_column).astype(np.float32, copy=False).reshape(len(ds), -1)
    if cfg.label_column in ds.column_names:
        y = _labels(ds, name, cfg.label_column)
        bad = (y < 0) | (y >= cfg.num_classes)
        if bad.any():
            raise DataError(f"split {name!r}: {int(bad.sum())} label(s) outside [0, {cfg.num_classes}) "
                             f"(first at row {int(np.argmax(bad))}); set data.num_classes")
    elif name == "transfer":
        y = np.full(len(ds), UNLABELED, np.int64)
    else:
        raise DataError(f"split {name!r} has no label column {cfg.label_column!r}; columns are "
                         f"{ds.column_names}: set data.label_column")
    if not np.isfinite(x).all():
        raise DataError(f"split {name!r}: non-finite values in input column {cfg.input_column!r}")
    return Split(name, x, y)


def _labels(ds, split: str, column: str) -> np.ndarray:
    """Integer class ids (a ClassLabel column arrives as its ids); class names are refused
    with how to map them, never parsed."""
    import pyarrow as pa

    kind = ds.data.column(column).type
    if not (pa.types.is_integer(kind) or pa.types.is_null(kind)):
        sample = sorted({str(v) for v in ds.data.column(column).slice(0, 1000).to_pylist()})[:4]
        raise DataError(f"split {split!r}: label column {column!r} holds {kind} values such as {sample}, not class "
                         f"ids 0..C-1: cast it to a ClassLabel, e.g. ds = ds.cast_column({column!r}, "
                         f"datasets.ClassLabel(names=[...])), or map each name to its id before saving")
    return _column(ds, column).astype(np.int64, copy=False)


def _column(ds, name: str) -> np.ndarray:
    """A column as NumPy straight from Arrow (list columns flattened to (N, L))."""
    import pyarrow as pa

    col = ds.data.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = np.array(col.flatten().to_numpy(zero_copy_only=False))  # a writable copy
        if len(col) and len(flat) % len(col):
            raise DataError(f"column {name!r} holds lists of different lengths; inputs must have one width")
        return flat.reshape(len(col), -1)
    return np.array(col.to_numpy(zero_copy_only=False))
