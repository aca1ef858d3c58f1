import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ClassifyDataConfig, DataSource
from pipeline.tasks.classify.data import UNLABELED, load_splits


def _write(path, name, n, width, labels=True):
    rng = np.random.default_rng(n)
    cols = {"feat": pa.array(list(rng.standard_normal((n, width)).astype(np.float32)),
                             type=pa.list_(pa.float32()))}
    if labels:
        cols["label"] = pa.array(rng.integers(0, 3, n))
    pq.write_table(pa.table(cols), path / f"{name}.parquet")


def test_parquet_folder_with_named_columns(tmp_path):
    _write(tmp_path, "train", 30, 5)
    _write(tmp_path, "test", 10, 5)
    _write(tmp_path, "transfer", 50, 5, labels=False)
    cfg = ClassifyDataConfig(source=DataSource.disk, name="mine", path=str(tmp_path), input_column="feat",
                     label_column="label", num_classes=3)
    s = load_splits(cfg, str(tmp_path))
    assert s["train"].x.shape == (30, 5) and s["train"].x.dtype == np.float32
    assert s["transfer"].x.shape == (50, 5) and (s["transfer"].y == UNLABELED).all()
    assert s.ranges() == {"transfer": (0, 50), "train": (50, 80), "test": (80, 90)}
    x, y = s.concat()
    np.testing.assert_array_equal(x[50:80], s["train"].x)


def test_missing_column_and_bad_labels_are_clear(tmp_path):
    _write(tmp_path, "train", 30, 5)
    _write(tmp_path, "test", 10, 5)
    cfg = ClassifyDataConfig(source=DataSource.disk, path=str(tmp_path), input_column="x", label_column="label",
                     num_classes=3)
    with pytest.raises(ValueError, match="no input column 'x'.*feat"):
        load_splits(cfg, str(tmp_path))
    cfg.input_column, cfg.num_classes = "feat", 2
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        load_splits(cfg, str(tmp_path))


def test_missing_split_is_named(tmp_path):
    _write(tmp_path, "train", 30, 5)
    cfg = ClassifyDataConfig(source=DataSource.disk, path=str(tmp_path), input_column="feat", label_column="label")
    with pytest.raises(ValueError, match=r"missing \['test'\]"):
        load_splits(cfg, str(tmp_path))


def test_mnist1d_is_generated_once_and_reused(tmp_path):
    cfg = ClassifyDataConfig(train_size=50, test_size=20, transfer_size=30)
    a = load_splits(cfg, str(tmp_path))
    b = load_splits(cfg, str(tmp_path))
    assert a.content_hash() == b.content_hash()
    assert a["train"].x.shape == (50, 40) and a["test"].y.shape == (20,)
    assert (a["transfer"].y == UNLABELED).all() and a["train"].labeled
    assert not list(tmp_path.glob("*.pkl"))  # never mnist1d's get_dataset pickle


def test_an_empty_split_is_named_in_one_line(tmp_path):
    import datasets

    from tests.support import error_line, run_cli

    _write(tmp_path, "train", 30, 5)
    _write(tmp_path, "test", 0, 5)  # a parquet file with no rows
    cfg = ClassifyDataConfig(source=DataSource.disk, path=str(tmp_path), input_column="feat", label_column="label",
                     num_classes=3)
    with pytest.raises(ValueError, match=r"split 'test' of .* has no rows"):
        load_splits(cfg, str(tmp_path))
    saved = tmp_path / "saved"  # save_to_disk of an empty split: datasets itself cannot load it back
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"feat": [[1.0, 2.0]], "label": [0]}),
                          "test": datasets.Dataset.from_dict({"feat": [], "label": []})}).save_to_disk(str(saved))
    line = error_line(run_cli(tmp_path / "root", "stage=1", "data=disk", f"data.path={saved}",
                              "data.input_column=feat", "data.label_column=label", "data.num_classes=3", code=1))
    assert "split(s) ['test'] were saved with no rows" in line and "leave the split out" in line


def test_class_name_labels_say_how_to_map_them(tmp_path):
    import datasets

    names = ["zero", "one", "two"]
    ds = datasets.Dataset.from_dict({"feat": [[0.5, 1.0]] * 6, "label": [names[i % 3] for i in range(6)]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "d"))
    cfg = ClassifyDataConfig(source=DataSource.disk, path=str(tmp_path / "d"), input_column="feat", label_column="label",
                     num_classes=3)
    with pytest.raises(ValueError, match=r"split 'train': label column 'label' holds string values such as "
                                         r"\['one', 'two', 'zero'\].*datasets.ClassLabel\(names="):
        load_splits(cfg, str(tmp_path))
    # the fix the message gives works: a ClassLabel column arrives as its ids
    labeled = ds.cast_column("label", datasets.ClassLabel(names=names))
    datasets.DatasetDict({"train": labeled, "test": labeled}).save_to_disk(str(tmp_path / "e"))
    cfg.path = str(tmp_path / "e")
    np.testing.assert_array_equal(load_splits(cfg, str(tmp_path))["train"].y, [0, 1, 2, 0, 1, 2])
