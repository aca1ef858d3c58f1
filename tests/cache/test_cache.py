"""Round trips through the real Zarr writer and reader, stock-client reads, refusals."""

import json
import os

import numpy as np
import pytest
import zarr

from pipeline.cache import Storage, open_cache, read_manifest
from pipeline.cache.fingerprint import check_fingerprint
from pipeline.cache.format import write_manifest
from tests.support import write_cache


@pytest.mark.parametrize("dtype,atol", [("float32", 0), ("float16", 1e-2), ("bfloat16", 1e-1)])
def test_round_trip(tmp_path, tiny_logits, dtype, atol):
    write_cache(tmp_path / "c", tiny_logits, dtype=dtype)
    r = open_cache(str(tmp_path / "c"))
    np.testing.assert_array_equal(r.ids.compute(), np.arange(100))
    got = r.logits.compute().astype(np.float32)
    np.testing.assert_allclose(got, tiny_logits, atol=atol, rtol=1e-2 if atol else 0)
    assert r.manifest.complete and r.manifest.missing_shards() == []
    assert r.manifest.shard_rows == 32 and len(r.manifest.shards) == 4


def test_stock_zarr_reads_it_with_no_project_code(tmp_path, tiny_logits):
    write_cache(tmp_path / "c", tiny_logits, dtype="float16")
    g = zarr.open_group(str(tmp_path / "c" / "zarr"), mode="r")
    assert g["logits"].shape == (100, 7) and g["logits"].dtype == np.float16
    assert g["logits"].shards == (32, 7) and g["logits"].chunks == (16, 7)
    codecs = json.dumps(g["logits"].metadata.to_dict())
    assert "sharding_indexed" in codecs and "crc32c" in codecs and "zstd" not in codecs  # floats: crc only
    assert "zstd" in json.dumps(g["ids"].metadata.to_dict())  # integers compress
    np.testing.assert_array_equal(g["ids"][:], np.arange(100))


def test_incomplete_cache_is_refused_naming_missing_shards(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits)
    m = read_manifest(Storage(path))
    m.shards[2].status, m.complete = "pending", False
    write_manifest(Storage(path), m)
    os.remove(os.path.join(path, "commits", "shard-00002.json"))
    with pytest.raises(ValueError, match=r"incomplete: shards \[2\]"):
        open_cache(path)
    assert open_cache(path, allow_partial=True).manifest.missing_shards() == [2]


def test_missing_manifest_and_wrong_version(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        open_cache(path)
    write_cache(path, tiny_logits)
    m = read_manifest(Storage(path))
    m.format_version = 99
    write_manifest(Storage(path), m)
    with pytest.raises(ValueError, match="format_version=99"):
        open_cache(path)


def test_fingerprint_mismatch_names_field_expected_and_found(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, fields={"dataset": "abc", "capture": {"dtype": "float16"}})
    open_cache(path, expected={"dataset": "abc"})
    with pytest.raises(ValueError, match="dataset: expected 'xyz', found 'abc'"):
        open_cache(path, expected={"dataset": "xyz"})
    with pytest.raises(ValueError, match="capture"):
        check_fingerprint(read_manifest(Storage(path)).fingerprint, {"capture": {"dtype": "float32"}}, path)
    # a derived cache holds its own representation: its capture is not compared, its data is
    derived = {"fields": {"dataset": "abc", "capture": {"dtype": "float16", "derived_from": "0f"}}}
    check_fingerprint(derived, {"dataset": "abc", "capture": {"dtype": "float32"}}, path)
    with pytest.raises(ValueError, match="dataset: expected 'xyz'"):
        check_fingerprint(derived, {"dataset": "xyz", "capture": {"dtype": "float16"}}, path)


def test_verify_detects_a_flipped_value(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype="float32")
    open_cache(path).verify()
    g = zarr.open_group(os.path.join(path, "zarr"), mode="r+")
    g["logits"][40, 3] = 123.0  # a write that bypasses the writer: the manifest checksum is stale
    with pytest.raises(ValueError, match=r"shard 1 \(rows 32:64\)"):
        open_cache(path).verify()


def test_corrupted_shard_bytes_raise_not_read_wrong(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype="float32")
    shard = os.path.join(path, "zarr", "logits", "c", "1", "0")
    data = bytearray(open(shard, "rb").read())
    data[20] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        open_cache(path).logits.compute()


ALL_MODES = ("full", "topk", "sampled")


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compression", ["ints", "all"])
def test_every_representation_round_trips(tmp_path, tiny_logits, backend, dtype, compression):
    import torch

    from pipeline.representations import represent

    m = write_cache(tmp_path / "c", tiny_logits, dtype=dtype, backend=backend, modes=ALL_MODES, k=3, samples=8,
                    compression=compression)
    r = open_cache(str(tmp_path / "c"))
    assert set(r.arrays) == {"ids", "logits", "topk_idx", "topk_val", "lse", "sampled_idx", "sampled_cnt",
                             "sampled_ent"}
    got = {name: a.compute() for name, a in r.arrays.items()}
    want = {}
    for shard in m.shards:  # recompute each shard as the writer did, same seeded generator
        gen = torch.Generator().manual_seed(shard.index)
        for name, v in represent(torch.from_numpy(tiny_logits[shard.start:shard.stop]), m, gen).items():
            v = v.view(torch.bfloat16).float() if dtype == "bfloat16" and name in ("logits", "topk_val") else v
            want.setdefault(name, []).append(v.numpy())
    for name, parts in want.items():
        np.testing.assert_array_equal(got[name].astype(np.float64), np.concatenate(parts).astype(np.float64),
                                      err_msg=name)
    np.testing.assert_array_equal(got["ids"], np.arange(100))
    assert got["topk_idx"].dtype == np.int32 and got["sampled_cnt"].dtype == np.uint16
    assert (got["sampled_cnt"].sum(1) == 8).all()
    r.verify()


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_narrow_cache_stores_uint16_ids_and_uint8_counts_and_reads_back_the_same(tmp_path, tiny_logits, backend):
    """cache.narrow: the same values as the wide cache through the reader and the stream
    (ids int32, the sampled padding -1, counts uint16), in fewer bytes on disk."""
    from pipeline.cache.format import row_bytes
    from pipeline.stream import CacheStream

    logits = np.concatenate([tiny_logits, np.full((100, 3), -50.0, np.float32)], 1)  # draws leave padding
    wide = write_cache(tmp_path / "w", logits, backend=backend, modes=ALL_MODES, k=3, samples=8)
    narrow = write_cache(tmp_path / "n", logits, backend=backend, modes=ALL_MODES, k=3, samples=8, narrow=True)
    assert row_bytes(narrow) == row_bytes(wide) - 3 * 2 - 8 * 2 - 8 * 1
    rw, rn = open_cache(str(tmp_path / "w")), open_cache(str(tmp_path / "n"))
    for name in rw.arrays:
        a, b = rw.arrays[name].compute(), rn.arrays[name].compute()
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert (rn.arrays["sampled_idx"].compute() == -1).any()  # the padding came back as -1
    names = ("topk_idx", "sampled_idx", "sampled_cnt")
    for x, y in zip(CacheStream(rw, splits=("train",), batch_size=16, seed=3, arrays=names),
                    CacheStream(rn, splits=("train",), batch_size=16, seed=3, arrays=names), strict=True):
        for name in names:
            assert x[name].dtype == y[name].dtype
            np.testing.assert_array_equal(x[name], y[name])
    if backend == "zarr":  # what a stock reader sees: the narrow dtypes
        import zarr

        g = zarr.open_group(str(tmp_path / "n" / "zarr"), mode="r")
        assert (g["topk_idx"].dtype, g["sampled_idx"].dtype, g["sampled_cnt"].dtype) == ("uint16", "uint16", "uint8")
    rn.verify()


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("bits,dtype", [(8, "float16"), (4, "bfloat16")])
def test_a_quantized_topk_cache_reads_back_within_its_bound(tmp_path, tiny_logits, backend, bits, dtype):
    """cache.value_bits: the reader and the stream give float32 top-k values within half a
    step of the exact ones; ids and logsumexp as in the unquantized cache; topk_q read only
    when asked for."""
    from pipeline.stream import CacheStream

    write_cache(tmp_path / "w", tiny_logits, dtype="float32", backend=backend, modes=("topk",), k=5)
    m = write_cache(tmp_path / "q", tiny_logits, dtype=dtype, backend=backend, modes=("topk",), k=5, value_bits=bits)
    rw, rq = open_cache(str(tmp_path / "w")), open_cache(str(tmp_path / "q"))
    exact, got = rw.arrays["topk_val"].compute(), rq.arrays["topk_val"].compute()
    step = rq.arrays["topk_q"].compute()[:, 1:]
    assert got.dtype == np.float32 and got.shape == exact.shape
    assert (np.abs(got - exact) <= step / 2 * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(got[:, 0], exact[:, 0])
    for name in ("topk_idx", "lse"):
        np.testing.assert_array_equal(rq.arrays[name].compute(), rw.arrays[name].compute())
    batches = list(CacheStream(rq, splits=("train",), batch_size=32, seed=1, arrays=("topk_idx", "topk_val")))
    assert all(set(b) == {"ids", "topk_idx", "topk_val"} for b in batches)
    rows = np.concatenate([b["ids"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["topk_val"] for b in batches]), got[rows])
    from pipeline.cache.format import row_bytes

    assert row_bytes(m) == 5 * 4 + (5 if bits == 8 else 3) + 8 + 4 * 2  # ids, codes, topk_q, lse at T = 1, 2
    rq.verify()


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("narrow,bits", [(False, 16), (True, 8)])
def test_an_adaptive_topk_cache_reads_back_its_kept_prefix_and_stores_less(tmp_path, backend, narrow, bits):
    """cache.top_p: each row is the full top-K cache's row up to its cut, then padding (id -1,
    value -inf) through the reader and the stream (not refused as non-finite); the same lse;
    fewer bytes on disk; checksums verify."""
    from pipeline.stream import CacheStream

    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((2000, 40)) * rng.uniform(0.5, 8, (2000, 1))).astype(np.float32)
    kw = dict(backend=backend, modes=("topk",), k=16, narrow=narrow, value_bits=bits, chunk_rows=256)
    write_cache(tmp_path / "k", logits, **kw)
    m = write_cache(tmp_path / "p", logits, top_p=0.8, **kw)
    assert m.top_p == 0.8
    rk, rp = open_cache(str(tmp_path / "k")), open_cache(str(tmp_path / "p"))
    ik, vk = rk.arrays["topk_idx"].compute(), rk.arrays["topk_val"].compute()
    ip, vp = rp.arrays["topk_idx"].compute(), rp.arrays["topk_val"].compute()
    kept = ip >= 0
    lens = kept.sum(1)
    assert lens.min() >= 1 and lens.max() <= 16 and len(set(lens.tolist())) > 3  # rows of many lengths
    assert (kept == (np.arange(16) < lens[:, None])).all()  # a prefix
    np.testing.assert_array_equal(ip[kept], ik[kept])
    if bits == 16:
        np.testing.assert_array_equal(vp[kept], vk[kept])
    assert np.isneginf(vp[~kept]).all()
    np.testing.assert_array_equal(rp.arrays["lse"].compute(), rk.arrays["lse"].compute())
    z = logits.astype(np.float64)
    p = np.exp(np.take_along_axis(z, ik.astype(np.int64), 1) - np.log(np.exp(z).sum(1, keepdims=True)))
    assert (((p * kept).sum(1) >= 0.8 - 1e-5) | (lens == 16)).all()  # enough mass ...
    assert ((p * kept).sum(1) - p[np.arange(2000), lens - 1] < 0.8 + 1e-5).all()  # ... and no more than needed
    rows = []
    for b in CacheStream(rp, splits=("train",), batch_size=50, seed=2, arrays=("topk_idx", "topk_val", "lse")):
        np.testing.assert_array_equal(b["topk_idx"], ip[b["ids"]])
        np.testing.assert_array_equal(b["topk_val"], vp[b["ids"]])
        rows.extend(b["ids"].tolist())
    assert sorted(rows) == list(range(2000))
    disk = {n: sum(f.stat().st_size for f in (tmp_path / n).rglob("*") if f.is_file()) for n in "kp"}
    assert disk["p"] < 0.8 * disk["k"], disk
    rp.verify()


def test_narrow_is_refused_for_a_vocabulary_or_a_draw_count_it_cannot_hold():
    import dataclasses

    from pipeline.capture import plan_manifest
    from pipeline.config import CacheConfig, CacheMode

    cache = CacheConfig(modes=[CacheMode.topk, CacheMode.sampled], k=4, samples=8, narrow=True, chunk_rows=64,
                        shard_chunks=2, temperatures=[1.0], sample_temperature=1.0)
    with pytest.raises(ValueError, match="holds 65535 classes; the teacher has 70000"):
        plan_manifest(cache, rows=10, num_classes=70000, splits={"train": (0, 10)}, fingerprint={})
    with pytest.raises(ValueError, match="cache.samples=300 can reach more than 255"):
        plan_manifest(dataclasses.replace(cache, samples=300), rows=10, num_classes=100,
                      splits={"train": (0, 10)}, fingerprint={})
    assert plan_manifest(cache, rows=10, num_classes=65535, splits={"train": (0, 10)}, fingerprint={}).narrow


STOCK_ZARR = """
import sys, warnings, zarr, numpy as np
warnings.simplefilter("error")  # the index files beside the group raise no ZarrUserWarning
g = zarr.open_group(sys.argv[1] + "/zarr", mode="r")
assert not [k for k in g.keys() if k not in g.array_keys()]
print(sorted(g.array_keys()), g["logits"].shape, g["logits"].dtype, g["topk_idx"][:2, 0].tolist(), g["ids"][-1])
"""
STOCK_ARROW = """
import sys, glob, pyarrow as pa, datasets
files = sorted(glob.glob(sys.argv[1] + "/shards/*.arrow"))
t = pa.ipc.open_file(pa.memory_map(files[0])).read_all()
ds = datasets.load_dataset("arrow", data_files=files, split="train")
print(t.column_names, t.num_rows, len(ds), ds[99]["ids"], len(ds[0]["logits"]))
"""


@pytest.mark.parametrize("backend,script", [("zarr", STOCK_ZARR), ("arrow", STOCK_ARROW)])
def test_stock_clients_read_the_cache_with_no_project_code(tmp_path, tiny_logits, backend, script):
    import subprocess
    import sys

    write_cache(tmp_path / "c", tiny_logits, backend=backend, modes=ALL_MODES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path / "c")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if backend == "zarr":
        assert "'logits', 'lse', 'sampled_cnt'" in proc.stdout and "(100, 7) float16" in proc.stdout
        assert proc.stdout.strip().endswith(" 99")
    else:
        assert "['ids', 'logits', 'topk_idx', 'topk_val', 'lse', 'sampled_idx', 'sampled_cnt'" in proc.stdout
        assert proc.stdout.split()[-3:] == ["100", "99", "7"]


def test_cut_arrow_shard_is_an_error_not_a_short_read(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, backend="arrow")
    shard = os.path.join(path, "shards", "shard-00001.arrow")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard 1 \(rows 32:64\): object 'shards/shard-00001.arrow' is \d+ bytes"):
        open_cache(path)  # the size in the commit record: refused on open, before any read
    from pipeline.cache import arrow_store, read_manifest

    storage = Storage(path)  # past that check, the read itself refuses too
    with pytest.raises(ValueError, match=r"array 'logits', object 'shards/shard-00001.arrow' \(rows 32:64\): not a whole Arrow IPC"):
        arrow_store.dask_arrays(storage, read_manifest(storage))["logits"].compute()
