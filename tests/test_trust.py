"""Trust in a cache: crash-safe resumable capture, concurrent workers, fingerprints, and
every way a cache can be damaged raising a clear error (never a silent wrong value)."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import Storage, open_cache, read_manifest
from pipeline.cache.commits import read_commits
from pipeline.cache.format import write_manifest
from pipeline.cache.storage import StorageError
from pipeline.hashing import hash_state_dict
from pipeline.stream import CacheStream
from tests.support import SMALL, error_line, run_cli, write_cache

MANY_SHARDS = ["cache.chunk_rows=64", "cache.shard_chunks=2"]  # 2,100 rows -> 17 shards


def array_hashes(path: str) -> dict[str, str]:
    g = zarr.open_group(os.path.join(path, "zarr"), mode="r")
    return {name: hashlib.sha256(np.ascontiguousarray(g[name][:]).tobytes()).hexdigest() for name in g.array_keys()}


def shard_sums(path: str) -> list[str]:
    return [s.sha256 for s in read_manifest(Storage(path)).shards]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process capture (its root also holds the fitted teacher),
    run as its own process like the killed captures below, which fit their own teacher: a
    fit inside the test process was seen to end on other weights than a fresh process's."""
    root = tmp_path_factory.mktemp("ref")
    cache = str(root / "cache")
    run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS, process=True)
    return root, cache


def _popen(root, *args, pause: float = 0.0):
    """Stage 1 through the CLI; ``pause``: seconds slept after each array of each shard
    written (tests/slow_writes.py), so a kill lands inside writes."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    entry = ["tests.slow_writes", str(pause)] if pause else ["pipeline.run"]
    return subprocess.Popen([sys.executable, "-m", *entry, f"paths.root={root}", *SMALL, *MANY_SHARDS,
                             "stage=1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.parametrize("world", [2, 4])
def test_concurrent_workers_equal_one_process(reference, world):
    root, ref = reference
    cache = str(root / f"workers-{world}")
    procs = [_popen(root, f"cache.path={cache}", f"rank={r}", f"world_size={world}") for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    manifest = read_manifest(Storage(cache))
    assert manifest.complete
    assert array_hashes(cache) == array_hashes(ref)
    assert shard_sums(cache) == shard_sums(ref)
    leftovers = [f for _, _, files in os.walk(cache) for f in files if ".tmp-" in f or f.endswith(".partial")]
    assert leftovers == []


def test_torchrun_two_workers_equal_one_process(reference):
    root, ref = reference
    cache = str(root / "torchrun")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pipeline.run", f"paths.root={root}",
                           *SMALL, *MANY_SHARDS, "stage=1", f"cache.path={cache}"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_WAIT_POLICY="passive"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stdout + proc.stderr
    assert array_hashes(cache) == array_hashes(ref)


def _names(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def open_writes(cache: str) -> set[int]:
    """The shards with an object written and no commit record: writes in progress, or cut."""
    committed = {int(m[1]) for f in _names(os.path.join(cache, "commits")) if (m := re.fullmatch(r"shard-(\d+)\.json", f))}
    return {int(d) for d in _names(os.path.join(cache, "zarr", "ids", "c")) if d.isdigit()} - committed


def test_killed_capture_resumes_to_the_identical_cache(reference, tmp_path):
    """SIGKILL once during the teacher fit and three times during capture (at least one of
    them inside a shard write, held open by a test pause), resume each time: the final cache
    equals an uninterrupted run's, array by array."""
    _, ref = reference
    root = tmp_path / "killed"  # fresh root: its own data and its own teacher fit
    cache = str(root / "cache")
    rng = random.Random(1234)
    pause = 0.12

    p = _popen(root, f"cache.path={cache}", pause=pause)
    assert _wait_for(lambda: glob.glob(str(root / "teachers" / "*")))  # the fit has started
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()

    mid_write, kills = 0, 0
    while kills < 3 or (mid_write == 0 and kills < 6):  # under load a kill may miss every write: retry
        kills += 1
        p = _popen(root, f"cache.path={cache}", pause=pause)
        while "capture: rank 0" not in (line := p.stdout.readline()):  # the capture loop has started
            assert line, "stage 1 ended before capturing"
        if kills <= 3:
            time.sleep(rng.uniform(0.05, 1.0))
        else:  # no kill has landed inside a write yet (a loaded machine): wait for one to be open
            _wait_for(lambda: open_writes(cache), timeout=60)
        p.send_signal(signal.SIGKILL)
        p.wait()
        # (what a kill leaves besides: temporaries, ignored here, removed by the next run)
        mid_write += bool(open_writes(cache))  # a shard object with no commit record: killed inside a write
    assert mid_write >= 1
    assert not read_manifest(Storage(cache)).complete
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(cache)

    p = _popen(root, f"cache.path={cache}")
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert "already committed" in out
    assert read_manifest(Storage(cache)).complete
    assert array_hashes(cache) == array_hashes(ref)
    assert shard_sums(cache) == shard_sums(ref)


# --- fingerprints -------------------------------------------------------------------------

FINGERPRINT_SCRIPT = """
import sys, torch
from pipeline.hashing import hash_state_dict
from pipeline.config import ClassifyDataConfig
from pipeline.tasks.classify.data import load_splits
from pipeline.tasks.classify.models import CNN1d
def fingerprints(folder):
    torch.manual_seed(0)
    return hash_state_dict(CNN1d(40, 10, 8)), load_splits(ClassifyDataConfig(train_size=30, test_size=10,
                                                                             transfer_size=20), folder).content_hash()
if __name__ == "__main__":
    print(*fingerprints(sys.argv[1]))
"""


def test_fingerprint_is_identical_across_processes(tmp_path):
    """The script's fingerprints in a fresh interpreter (a hash seed of its own) equal this
    process's, computed the same way."""
    other = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT, str(tmp_path / "other")], capture_output=True,
                           text=True, timeout=300, check=True).stdout.split()
    script = {"__name__": "fingerprint"}
    exec(FINGERPRINT_SCRIPT, script)
    assert list(script["fingerprints"](str(tmp_path / "here"))) == other and len(other) == 2


def test_changed_weight_row_or_k_changes_the_fingerprint_and_is_refused(reference):
    root, ref = reference
    from pipeline.tasks.classify import Classify
    from pipeline.tasks.classify.data import Split, Splits, load_splits
    from pipeline.tasks.classify.models import CNN1d
    from tests.support import compose_config

    torch.manual_seed(0)
    model = CNN1d(40, 10, 8)
    h = hash_state_dict(model)
    with torch.no_grad():
        model.head[1].weight[0, 0] += 1e-3
    assert hash_state_dict(model) != h

    cfg = compose_config(f"paths.root={root}", *SMALL, *MANY_SHARDS)
    splits = load_splits(cfg.data, str(root))
    task = Classify(cfg)
    good = task.expected_fields(splits)
    open_cache(ref, expected=good)  # the matching config reads it

    x = splits["train"].x.copy()
    x[3, 5] += 1.0  # one changed row
    changed = Splits({**splits.splits, "train": Split("train", x, splits["train"].y)}, splits.num_classes)
    with pytest.raises(ValueError, match="dataset: expected"):
        open_cache(ref, expected=task.expected_fields(changed))

    cfg_k = compose_config(f"paths.root={root}", *SMALL, *MANY_SHARDS, "cache.modes=[full,topk]", "cache.k=5")
    with pytest.raises(ValueError, match="capture: expected"):
        open_cache(ref, expected=Classify(cfg_k).expected_fields(splits))
    with pytest.raises(ValueError, match="teacher_weights: expected"):
        open_cache(ref, expected={**good, "teacher_weights": hash_state_dict(model)})


# --- stage 1 heals a damaged cache, owns only what it made ---------------------------------


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01
    open(path, "wb").write(bytes(data))


def _cut(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _edit_manifest(cache: str) -> None:
    f = os.path.join(cache, "manifest.json")
    open(f, "w").write(open(f).read().replace('"complete": true', '"complete": false'))


DAMAGE = {  # name: (damage(cache), shards stage 1 must write, verify)
    "shard deleted": (lambda c: os.remove(os.path.join(c, "zarr", "logits", "c", "5", "0")), 1, False),
    "shard truncated": (lambda c: _cut(os.path.join(c, "zarr", "logits", "c", "5", "0")), 1, False),
    "ids shard truncated": (lambda c: _cut(os.path.join(c, "zarr", "ids", "c", "9")), 1, False),
    "byte flipped": (lambda c: _flip(os.path.join(c, "zarr", "logits", "c", "5", "0")), 1, True),
    # the complete manifest records the shard too: nothing to redo
    "commit record deleted": (lambda c: os.remove(os.path.join(c, "commits", "shard-00005.json")), 0, False),
    "commit record garbled": (lambda c: open(os.path.join(c, "commits", "shard-00005.json"), "w").write("{x"), 1,
                              False),
    "array metadata deleted": (lambda c: os.remove(os.path.join(c, "zarr", "logits", "zarr.json")), 0, False),
    "plan deleted": (lambda c: os.remove(os.path.join(c, "kdcache.json")), 0, False),
    "manifest edited": (_edit_manifest, 0, False),
    "manifest deleted": (lambda c: os.remove(os.path.join(c, "manifest.json")), 0, False),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_stage1_heals_any_damage_recapturing_only_the_damaged_shard(reference, tmp_path, damage):
    root, ref = reference
    cache = str(tmp_path / "c")
    shutil.copytree(ref, cache)
    hurt, written, verify = DAMAGE[damage]
    hurt(cache)
    proc = run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS, f"verify={str(verify).lower()}")
    assert re.search(rf"rank 0 wrote {written} shard\(s\)", proc.stdout + proc.stderr), proc.stdout[-2000:]
    assert array_hashes(cache) == array_hashes(ref) and shard_sums(cache) == shard_sums(ref)
    assert read_manifest(Storage(cache)).complete
    open_cache(cache).verify()


def test_a_flipped_byte_found_by_stage3_points_to_the_fix_that_works(reference, tmp_path):
    root, ref = reference
    cache = str(tmp_path / "c")
    shutil.copytree(ref, cache)
    _flip(os.path.join(cache, "zarr", "logits", "c", "5", "0"))
    line = error_line(run_cli(root, "stage=3", f"cache.path={cache}", *MANY_SHARDS, code=1))
    assert "array 'logits', object 'zarr/logits/c/5/0' (rows 640:704)" in line and "stage=1 verify=true" in line


@pytest.mark.parametrize("what", ["folder", "file", "folder with its own manifest.json"])
def test_a_path_that_is_not_a_cache_is_never_touched(reference, tmp_path, what):
    root, _ = reference
    target = tmp_path / "mine"
    if what == "file":
        target.write_text("hi")
    else:
        (target / "sub").mkdir(parents=True)
        (target / "notes.txt").write_text("my notes")
        (target / "sub" / "y.txt").write_text("y")
        if "manifest" in what:  # a web app's, say: the name alone does not make a folder a cache
            (target / "manifest.json").write_text('{"name": "my app"}')
    before = {str(p): p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
    for extra in ([], ["cache.overwrite=true"]):  # not even overwrite deletes what is not a cache
        line = error_line(run_cli(root, "stage=1", f"cache.path={target}", *MANY_SHARDS, *extra, code=1))
        assert str(target) in line and ("not a cache" in line or "a file, not a folder" in line)
        after = {str(p): p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
        assert after == before


def test_a_cache_with_other_settings_is_kept_unless_overwrite(reference, tmp_path):
    root, ref = reference
    cache = str(tmp_path / "c")
    shutil.copytree(ref, cache)
    line = error_line(run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS, "cache.dtype=float32", code=1))
    assert "captured with other settings" in line and "cache.overwrite=true" in line
    assert array_hashes(cache) == array_hashes(ref)  # untouched
    out = run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS, "cache.dtype=float32", "cache.overwrite=true")
    assert "dtype: cache has 'float16', this run 'float32'" in out.stdout + out.stderr
    assert zarr.open_group(os.path.join(cache, "zarr"), mode="r")["logits"].dtype == np.float32


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_two_identical_runs_at_once_share_the_work_and_both_succeed(reference, tmp_path, backend):
    root, _ = reference
    single = str(tmp_path / "single")
    run_cli(root, "stage=1", f"cache.path={single}", *MANY_SHARDS, f"cache={backend}")
    cache = str(tmp_path / "both")
    procs = [_popen(root, f"cache.path={cache}", f"cache={backend}") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    written = [int(re.search(r"rank 0 wrote (\d+) shard\(s\)", o).group(1)) for o in outs]
    assert sum(written) == 17  # each shard written once, by one of them
    folders = [re.search(r"run folder: (\S+)", o).group(1) for o in outs]
    assert folders[0] != folders[1] and all(os.path.exists(os.path.join(f, "run.log")) for f in folders)
    assert shard_sums(cache) == shard_sums(single)
    open_cache(cache).verify()


# --- full disks, read-only paths -----------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount(name, size, ro=False)``: a real tmpfs of ``size`` bytes (root only; skipped
    with the reason where mounting is not allowed), unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str, ro: bool = False) -> str:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_an_injected_enospc_is_one_line_and_keeps_committed_shards(tmp_path, tiny_logits, monkeypatch):
    from pipeline.cache import zarr_store

    real = zarr_store.write_shard

    def disk_full_at_shard_2(storage, m, shard, arrays):
        if shard.index == 2:
            raise OSError(errno.ENOSPC, "No space left on device", storage.path("zarr/logits/c/2/0"))
        return real(storage, m, shard, arrays)

    path, clean = str(tmp_path / "c"), str(tmp_path / "clean")
    monkeypatch.setattr(zarr_store, "write_shard", disk_full_at_shard_2)
    with pytest.raises(StorageError) as e:
        write_cache(path, tiny_logits, dtype="float32")
    assert str(e.value) == (f"no space left on device writing {path}/zarr/logits/c/2/0; free space or fix the "
                            "permissions, then re-run stage 1: committed shards are kept")
    m = read_manifest(Storage(path))
    assert not m.complete and sorted(read_commits(Storage(path)))[:2] == [0, 1]
    monkeypatch.undo()
    write_cache(path, tiny_logits, dtype="float32")  # resumes
    write_cache(clean, tiny_logits, dtype="float32")
    assert array_hashes(path) == array_hashes(clean)


def test_a_failed_checkpoint_write_leaves_no_temporary(tmp_path, monkeypatch):
    from pipeline.cache import storage
    from pipeline.training import save_state

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", disk_full)  # fails after the bytes are written, before the rename
    target = tmp_path / "students" / "state.pt"
    with pytest.raises(StorageError, match=r"^no space left on device writing .*state.pt; .*training resumes"):
        save_state(str(target), model=torch.zeros(1000))
    assert list(target.parent.iterdir()) == []


def test_a_real_full_disk_during_capture_then_resume(reference, mount_tmpfs):
    root, ref = reference
    small = mount_tmpfs("small", "96k")  # the cache needs ~60 pages of 4 KiB here
    cache = os.path.join(small, "cache")
    line = error_line(run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS, code=1))
    assert f"no space left on device writing {small}" in line and "committed shards are kept" in line
    assert not read_manifest(Storage(cache)).complete
    subprocess.run(["mount", "-o", "remount,size=4m", small], check=True)
    proc = run_cli(root, "stage=1", f"cache.path={cache}", *MANY_SHARDS)
    assert "already committed" in proc.stdout + proc.stderr
    assert array_hashes(cache) == array_hashes(ref)


def test_a_read_only_cache_path_fails_before_the_teacher_is_fitted(tmp_path, mount_tmpfs):
    ro = mount_tmpfs("ro", "1m", ro=True)
    root = tmp_path / "fresh"
    line = error_line(run_cli(root, "stage=1", f"cache.path={ro}/cache", code=1))
    assert f"read-only file system writing {ro}; cache.path must be writable" in line
    assert not (root / "teachers").exists() and not (root / "datasets").exists()
    line = error_line(run_cli(f"{ro}/root", "stage=1", code=1))  # before Hydra makes its run folder there
    assert f"read-only file system writing {ro}" in line and "paths.root must be a writable folder" in line


# --- the corruption matrix ------------------------------------------------------------------


@pytest.fixture
def cache32(tmp_path, tiny_logits):
    path = str(tmp_path / "c")
    write_cache(path, tiny_logits, dtype="float32", chunk_rows=16, shard_chunks=2)  # shards of 32 rows
    return path


def _stream_all(path, **kw):
    s = CacheStream(open_cache(path, **kw), splits=("train",), batch_size=10, seed=0)
    return np.concatenate([b["ids"] for b in s])


def test_flipped_byte_raises_naming_array_object_and_rows(cache32):
    f = os.path.join(cache32, "zarr", "logits", "c", "1", "0")
    data = bytearray(open(f, "rb").read())
    data[100] ^= 0x01
    open(f, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"array 'logits', object 'zarr/logits/c/1/0' \(rows 32:48\): chunk 0 does not "
                                         r"match its crc32c.*stage=1 verify=true"):
        _stream_all(cache32)
    with pytest.raises(ValueError, match=r"'zarr/logits/c/1/0' \(rows 32:48\): chunk 0 does not match its crc32c"):
        open_cache(cache32).logits.compute()  # whole chunks, read straight into the block
    with pytest.raises(ValueError, match=r"1 damaged shard\(s\):\n  shard 1 \(rows 32:64\): .*'logits', object "
                                         r"'zarr/logits/c/1/0'.*stage=1 verify=true"):
        open_cache(cache32).verify()  # stage 2's verify names it too, with the same fix


def test_truncated_or_deleted_shard_is_named_on_open(cache32):
    f = os.path.join(cache32, "zarr", "logits", "c", "2", "0")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 3])
    os.remove(os.path.join(cache32, "zarr", "logits", "c", "3", "0"))
    with pytest.raises(ValueError, match=r"2 damaged shard\(s\):\n  shard 2 \(rows 64:96\): object 'zarr/logits/c/2/0' is "
                                         r"\d+ bytes, \d+ were written\n  shard 3 \(rows 96:100\): object "
                                         r"'zarr/logits/c/3/0' is missing\nrun stage 1 again"):
        open_cache(cache32)


def test_edited_or_deleted_manifest(cache32):
    f = os.path.join(cache32, "manifest.json")
    text = open(f).read()
    open(f, "w").write(text.replace('"rows": 100', '"rows": 90'))
    with pytest.raises(ValueError, match="does not match its own checksum.*run stage 1 again"):
        open_cache(cache32)
    os.remove(f)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        open_cache(cache32)


def test_rows_never_written_are_refused_or_skipped_never_filled(cache32):
    storage = Storage(cache32)
    m = read_manifest(storage)
    m.complete = False
    for s in m.shards:
        s.status, s.sha256 = "pending", None
    write_manifest(storage, m)
    os.remove(os.path.join(cache32, "commits", "shard-00002.json"))
    for key in ("zarr/ids/c/2", "zarr/logits/c/2/0"):
        os.remove(os.path.join(cache32, key))  # the shard was never written
    with pytest.raises(ValueError, match=r"incomplete: shards \[2\]"):
        open_cache(cache32)
    ids = _stream_all(cache32, allow_partial=True)  # only the committed part, explicitly asked for
    assert sorted(ids.tolist()) == [i for i in range(100) if not 64 <= i < 96]


def test_non_finite_teacher_values_are_named(tmp_path, tiny_logits):
    bad = tiny_logits.copy()
    bad[[7, 41]] = np.nan
    path = str(tmp_path / "c")
    write_cache(path, bad, dtype="float32")
    with pytest.raises(ValueError, match=r"non-finite logits at ids \[(7|41|7, 41|41, 7)\] \([12] rows\)"):
        _stream_all(path)


