"""The stream: every id once per epoch, seeded order, exact resume."""

import os

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.stream import CacheRows, CacheStream
from tests.support import write_cache


def _ids(stream):
    return np.concatenate([b["ids"] for b in stream])


def test_every_selected_id_once_per_epoch(tiny_cache):
    r = open_cache(tiny_cache)
    s = CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=0, shuffle_window=2)
    for _ in range(2):
        ids = _ids(s)
        assert sorted(ids.tolist()) == list(range(90))  # test rows (90..99) never served
    assert s.epoch == 2


def test_logits_travel_with_their_ids(tiny_cache, tiny_logits):
    s = CacheStream(open_cache(tiny_cache), splits=("train",), batch_size=7, seed=3, shuffle_window=3)
    for b in s:
        ids, logits = b["ids"], b["logits"]
        np.testing.assert_allclose(logits.astype(np.float32), tiny_logits[ids], atol=1e-2)
        assert ((ids >= 60) & (ids < 90)).all()


def test_order_is_seeded(tiny_cache):
    r = open_cache(tiny_cache)
    a = _ids(CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=1))
    b = _ids(CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=1))
    c = _ids(CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))  # not the cache's own order


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 11])
def test_resume_yields_exactly_the_rest_of_the_epoch(tiny_cache, cut):
    r = open_cache(tiny_cache)
    full = _ids(CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=5, shuffle_window=2))
    s = CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=5, shuffle_window=2)
    it = iter(s)
    seen = [next(it)["ids"] for _ in range(cut)]
    state = s.state_dict()
    it.close()
    resumed = CacheStream(r, splits=("transfer", "train"), batch_size=8, seed=5, shuffle_window=2)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    head = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.concatenate([head, rest]), full)
    assert len(set(head) & set(rest)) == 0


def test_state_from_another_seed_is_refused(tiny_cache):
    s = CacheStream(open_cache(tiny_cache), splits=("train",), batch_size=8, seed=5)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 1, "seed": 6})


@pytest.mark.parametrize("backend,dtype,compression", [
    ("zarr", "bfloat16", "ints"), ("zarr", "float32", "ints"), ("zarr", "float16", "all"),
    ("zarr", "float16", "none"), ("arrow", "float16", "ints"), ("arrow", "bfloat16", "ints")])
def test_every_backend_and_dtype_streams_the_cached_values(tmp_path, tiny_logits, backend, dtype, compression):
    """Rows read into the reused window buffers (Zarr: decoded by pipeline.cache.chunk_reader)
    equal the whole cache read through Dask and zarr, across epochs (a stale buffer would show
    as another row's values)."""
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype=dtype, backend=backend, modes=("full", "topk", "sampled"),
                compression=compression)
    r = open_cache(path)
    whole = {n: a.compute() for n, a in r.arrays.items()}
    s = CacheStream(r, splits=("train",), batch_size=9, seed=0, shuffle_window=1, prefetch=1)
    for _ in range(3):
        seen = []
        for b in s:
            for name, values in b.items():
                assert values.dtype == whole[name].dtype, name
                np.testing.assert_array_equal(values, whole[name][b["ids"]], err_msg=name)
            seen.append(b["ids"])
        assert sorted(np.concatenate(seen).tolist()) == list(range(100))
    assert len(s._buffers) <= s.prefetch + 2  # the ring, not one buffer per window
    rows = CacheRows(r, None).read_rows(7, 83)  # in one buffer, across chunk and shard ends
    assert rows.keys() == whole.keys()
    for name, values in rows.items():
        assert values.dtype == whole[name].dtype, name
        np.testing.assert_array_equal(values, whole[name][7:83], err_msg=name)


def test_rows_read_whole_are_checked_and_bounded(tmp_path, tiny_logits):
    bad = tiny_logits.copy()
    bad[[5, 70]] = np.nan
    path = str(tmp_path / "c")
    write_cache(path, bad)
    rows = CacheRows(open_cache(path), ("logits",))
    with pytest.raises(ValueError, match=r"non-finite logits at ids \[5, 70\] \(cache rows \[5, 70\]\)"):
        rows.read_rows(0, 100)
    np.testing.assert_array_equal(rows.read_rows(6, 70)["logits"], bad[6:70].astype(np.float16))
    with pytest.raises(ValueError, match="rows 90:101 are outside cache"):
        rows.read_rows(90, 101)


def test_non_finite_bfloat16_rows_are_named(tmp_path, tiny_logits):
    bad = tiny_logits.copy()
    bad[[5, 70]] = np.inf
    path = str(tmp_path / "c")
    write_cache(path, bad, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"non-finite logits at ids \[(5, 70|70, 5)\] \(2 rows\)"):
        _ids(CacheStream(open_cache(path), splits=("train",), batch_size=8, seed=0, shuffle_window=16))


def test_closing_a_stream_early_never_hangs_its_producer(tiny_cache):
    """The consumer leaving with the queue full (a training loop that stops mid-epoch)
    must stop the background producer, whatever it was putting."""
    import threading
    import time

    from pipeline.stream import background

    def leave_early():
        g = background(iter(range(3)), 2)  # the producer ends while the queue is full
        next(g)
        time.sleep(0.3)  # let it fill the queue and reach its last put
        g.close()
        s = CacheStream(open_cache(tiny_cache), splits=("train",), batch_size=2, seed=0, shuffle_window=1,
                        prefetch=1)
        for i, _ in enumerate(s):
            if i == len(s) - 2:
                break

    t = threading.Thread(target=leave_early, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive()


def test_prefetch_below_one_is_refused(tiny_cache):
    with pytest.raises(ValueError, match="prefetch=0: must be >= 1"):
        CacheStream(open_cache(tiny_cache), splits=("train",), batch_size=2, seed=0, prefetch=0)


def test_the_direct_chunk_decoder_serves_every_zarr_array_of_a_cache(tiny_cache):
    """Every array this project writes has the layout the direct decoder reads, so the
    stream never falls back to zarr's slow path on its own caches."""
    import zarr

    from pipeline.cache.chunk_reader import plain_layout

    g = zarr.open_group(os.path.join(tiny_cache, "zarr"), mode="r")
    assert all(plain_layout(g[name]) is not None for name in g.array_keys())


def test_the_sequence_stream_names_a_non_finite_token_row(tmp_path):
    """Token caches go through the same read path and the same check as sample caches: a
    NaN in one token's row is named by its sequence and its cache row, never trained on."""
    from pipeline.sequence_stream import SequenceStream

    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 7]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    logits = rng.standard_normal((offsets[-1], 12)).astype(np.float32)
    logits[11, 4] = np.nan  # sequence 1 (rows 5:14)
    path = tmp_path / "tokens"
    write_cache(path, logits, modes=("topk",), k=4, chunk_rows=4, shard_chunks=2, offsets=offsets,
                splits={"train": [0, int(offsets[-1])]})
    reader = open_cache(str(path))
    tokens = np.arange(offsets[-1]) % 12
    stream = SequenceStream(reader, tokens, split="train", batch_size=2, seed=0, arrays=("topk_idx", "topk_val", "lse"))
    with pytest.raises(ValueError, match=r"non-finite (topk_val|lse) at sequences \[1\] \(cache rows \[11\]\)"):
        list(stream)
    ok = SequenceStream(reader, tokens, split="train", batch_size=2, seed=0, arrays=("topk_idx",))
    assert sorted(i for b in ok for i in b.sequences.tolist()) == [0, 1, 2, 3]  # ids hold no float: nothing to refuse


@pytest.mark.parametrize("bits", [8, 4])
def test_a_narrow_quantized_token_cache_lands_on_the_grid_decoded(tmp_path, bits):
    """The sequence stream decodes narrow ids and quantized values on the padded grid: the
    same rows as the reader gives, only topk_q's extra read dropped."""
    from pipeline.sequence_stream import SequenceStream

    rng = np.random.default_rng(2)
    offsets = np.array([0, 5, 12, 15])
    logits = rng.standard_normal((15, 20)).astype(np.float32)
    write_cache(tmp_path / "q", logits, modes=("topk",), k=5, chunk_rows=4, shard_chunks=1, offsets=offsets,
                splits={"train": [0, 15]}, narrow=True, value_bits=bits)
    reader = open_cache(str(tmp_path / "q"))
    tokens = np.arange(15) % 20
    batch = SequenceStream(reader, tokens, split="train", batch_size=3, seed=0,
                           arrays=("topk_idx", "topk_val")).read(np.array([1, 2, 0]))
    assert set(batch.teacher) == {"topk_idx", "topk_val"}
    assert batch.teacher["topk_idx"].dtype == np.int32 and batch.teacher["topk_val"].dtype == np.float32
    idx, val = reader.arrays["topk_idx"].compute(), reader.arrays["topk_val"].compute()
    width = batch.input_ids.shape[1]
    for j, i in enumerate([1, 2, 0]):
        n = offsets[i + 1] - offsets[i]
        np.testing.assert_array_equal(batch.teacher["topk_idx"][j * width:j * width + n], idx[offsets[i]:offsets[i + 1]])
        np.testing.assert_array_equal(batch.teacher["topk_val"][j * width:j * width + n], val[offsets[i]:offsets[i + 1]])


def test_adaptive_token_rows_land_on_the_grid_and_train_with_the_mask(tmp_path):
    """A narrow 4-bit adaptive top-k token cache (rows of different lengths, padded with -1 /
    -inf) through the sequence stream: each row lands at its position with its padding, the
    grid's padding positions hold zeros, and the masked top-k loss equals the plain torch
    one over the real rows only: garbage written at the unmasked positions changes nothing."""
    from pipeline.losses import topk_kl_loss, torch_topk_kl
    from pipeline.sequence_stream import SequenceStream

    rng = np.random.default_rng(8)
    offsets = np.array([0, 9, 14, 30])
    logits = (rng.standard_normal((30, 24)) * rng.uniform(0.5, 6, (30, 1))).astype(np.float32)
    write_cache(tmp_path / "a", logits, modes=("topk",), k=8, chunk_rows=8, shard_chunks=1, offsets=offsets,
                splits={"train": [0, 30]}, narrow=True, value_bits=4, temperatures=(1.0,), top_p=0.75)
    reader = open_cache(str(tmp_path / "a"))
    idx, val = reader.arrays["topk_idx"].compute(), reader.arrays["topk_val"].compute()
    assert len(set((idx >= 0).sum(1).tolist())) > 2
    tokens = np.arange(30) % 24
    batch = SequenceStream(reader, tokens, split="train", batch_size=3, seed=0,
                           arrays=("topk_idx", "topk_val", "lse")).read(np.array([2, 0, 1]))
    t, mask = batch.teacher, batch.mask
    width = batch.input_ids.shape[1]
    for j, i in enumerate([2, 0, 1]):
        rows = slice(j * width, j * width + offsets[i + 1] - offsets[i])
        np.testing.assert_array_equal(t["topk_idx"][rows], idx[offsets[i]:offsets[i + 1]])
        np.testing.assert_array_equal(t["topk_val"][rows], val[offsets[i]:offsets[i + 1]])
    assert mask.sum() == 30
    s = torch.from_numpy(rng.standard_normal((len(mask), 24)).astype(np.float32))
    lse = t["lse"][:, 0]
    got = topk_kl_loss(s, t["topk_idx"], t["topk_val"], lse, mask=mask)
    want = torch_topk_kl(s[mask], *(torch.from_numpy(a[mask]) for a in (t["topk_idx"], t["topk_val"], lse)), 1.0).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    junk = {n: a.copy() for n, a in t.items()}
    junk["topk_idx"][~mask], junk["topk_val"][~mask], junk["lse"][~mask] = 5, np.nan, np.nan
    torch.testing.assert_close(topk_kl_loss(s, junk["topk_idx"], junk["topk_val"], junk["lse"][:, 0], mask=mask), got)


def test_rows_at_some_positions_land_on_their_positions(tmp_path):
    """A chat cache: sequence i's rows belong at ``positions`` of its tokens. Each row's
    values land there on the grid, the mask is exactly those positions, and a stream without
    the token data's offsets is refused."""
    from pipeline.sequence_stream import SequenceStream

    rng = np.random.default_rng(1)
    lengths = [6, 10, 4]  # tokens per sequence
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    positions = np.array([2, 3, 4, 0, 5, 6, 7, 8, 1], dtype=np.int32)  # rows: 3, 5, 1 per sequence
    offsets = np.array([0, 3, 8, 9])
    logits = rng.standard_normal((9, 12)).astype(np.float32)
    write_cache(tmp_path / "chat", logits, modes=("topk",), k=4, chunk_rows=4, shard_chunks=1, offsets=offsets,
                positions=positions, splits={"train": [0, 9]})
    reader = open_cache(str(tmp_path / "chat"))
    tokens = np.arange(token_offsets[-1]) % 12
    with pytest.raises(ValueError, match="pass the token data's offsets"):
        SequenceStream(reader, tokens, split="train", batch_size=3, seed=0, arrays=("lse",))
    stream = SequenceStream(reader, tokens, split="train", batch_size=3, seed=0, arrays=("lse",),
                            token_offsets=token_offsets)
    batch = stream.read(np.array([2, 0, 1]))
    width = batch.input_ids.shape[1]
    lse = np.asarray(reader.arrays["lse"][:, 0])
    expected = np.zeros(3 * width, bool)
    for j, i in enumerate([2, 0, 1]):
        where = j * width + positions[offsets[i]:offsets[i + 1]]
        expected[where] = True
        np.testing.assert_array_equal(batch.teacher["lse"][where, 0], lse[offsets[i]:offsets[i + 1]])
        assert batch.input_ids[j, :lengths[i]].tolist() == tokens[token_offsets[i]:token_offsets[i + 1]].tolist()
    np.testing.assert_array_equal(batch.mask, expected)
    scored = np.zeros((3, width - 1), bool)  # a row there and a next token
    for j, i in enumerate([2, 0, 1]):
        p = positions[offsets[i]:offsets[i + 1]]
        scored[j, p[p + 1 < lengths[i]]] = True
    np.testing.assert_array_equal(batch.label_mask().numpy(), scored)
    assert scored.sum() == 9


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_finiteness_scan_finds_any_nan_or_infinity(dtype):
    """all_finite scans by blocks of FINITE_BLOCK values: a bad value first, last, on either
    side of a block's end, or alone in a short tail is found; the largest finite value is not bad."""
    from pipeline.kernels._base import FINITE_BLOCK, all_finite

    n = 3 * FINITE_BLOCK + 5
    x = np.random.default_rng(0).standard_normal(n).astype(dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(x.reshape(-1, 1)[::2])
    x[7] = np.finfo(dtype).max
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, FINITE_BLOCK - 1, FINITE_BLOCK, n - 1):
            y = x.copy()
            y[at] = bad
            assert not all_finite(y), (bad, at)
            assert not all_finite(y.reshape(-1, 1))
