"""Round trips through the real Zarr writer and reader, stock-client reads, refusals."""

import json
import os

import numpy as np
import pytest
import zarr

from pipeline.cache import Storage, open_cache, read_manifest
from pipeline.cache.fingerprint import check_fingerprint
from tests.conftest import write_cache


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
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert g["logits"].shape == (100, 7) and g["logits"].dtype == np.float16
    assert g["logits"].shards == (32, 7) and g["logits"].chunks == (16, 7)
    codecs = json.dumps(g["logits"].metadata.to_dict())
    assert "sharding_indexed" in codecs and "crc32c" in codecs and "zstd" in codecs
    np.testing.assert_array_equal(g["ids"][:], np.arange(100))


def test_incomplete_cache_is_refused_naming_missing_shards(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits)
    m = read_manifest(Storage(path))
    m.shards[2].status, m.complete = "pending", False
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write(m.to_json())
    with pytest.raises(ValueError, match=r"incomplete: shards \[2\]"):
        open_cache(path)
    assert open_cache(path, allow_partial=True).manifest.missing_shards() == [2]


def test_missing_manifest_and_wrong_version(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        open_cache(path)
    write_cache(path, tiny_logits)
    raw = json.loads(open(os.path.join(path, "manifest.json")).read())
    raw["format_version"] = 99
    open(os.path.join(path, "manifest.json"), "w").write(json.dumps(raw))
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


def test_verify_detects_a_flipped_value(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype="float32")
    open_cache(path).verify()
    g = zarr.open_group(path, mode="r+")
    g["logits"][40, 3] = 123.0  # a write that bypasses the writer: the manifest checksum is stale
    with pytest.raises(ValueError, match=r"shard 1 \(rows 32:64\)"):
        open_cache(path).verify()


def test_corrupted_shard_bytes_raise_not_read_wrong(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype="float32")
    shard = os.path.join(path, "logits", "c", "1", "0")
    data = bytearray(open(shard, "rb").read())
    data[20] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        open_cache(path).logits.compute()
