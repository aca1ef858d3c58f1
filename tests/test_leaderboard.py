"""The leaderboard: a sweep of students x losses from one cache, and concurrent updates."""

import functools
import glob
import json
import multiprocessing as mp
import os

from pipeline.leaderboard import update_leaderboard
from tests.support import run_cli


def _sweep(root, *args):
    run_cli(root, "-m", "stage=3", *args)


def test_sweep_of_two_students_by_two_losses_fills_the_leaderboard(seeded):
    tmp_path = seeded
    run_cli(tmp_path, "stage=1")
    _sweep(tmp_path, "student=linear,mlp", "loss=kl,mse")
    (folder,) = glob.glob(str(tmp_path / "leaderboards" / "*"))
    board = json.load(open(os.path.join(folder, "leaderboard.json")))
    assert sorted((r["student"], r["loss"]) for r in board) == [("linear", "kl"), ("linear", "mse"), ("mlp", "kl"),
                                                                  ("mlp", "mse")]
    runs = glob.glob(str(tmp_path / "multiruns" / "*" / "*" / "results.json"))
    assert len(runs) == 4
    for path in runs:
        (row,) = json.load(open(path))["students"]
        (same,) = [r for r in board if (r["student"], r["loss"]) == (row["student"], row["loss"])]
        assert same == row
    assert os.path.getsize(os.path.join(folder, "leaderboard.png")) > 1000
    assert "| 1 |" in open(os.path.join(folder, "leaderboard.md")).read()

    # a sweep over the temperature and the epochs: one row per distinct student, whatever it
    # shares with others; (mlp, kl, T=2, 1 epoch) is the first sweep's run again and replaces it
    _sweep(tmp_path, "student=mlp", "loss=kl", "loss.temperature=2,4", "train.epochs=1,2")
    board = json.load(open(os.path.join(folder, "leaderboard.json")))
    assert len(board) == 4 + 3 and len({r["key"] for r in board}) == 7
    mlp_kl = sorted((r["settings"]["loss.temperature"], r["settings"]["train.epochs"]) for r in board
                    if (r["student"], r["loss"]) == ("mlp", "kl"))
    assert mlp_kl == [(2.0, 1), (2.0, 2), (4.0, 1), (4.0, 2)]
    header = open(os.path.join(folder, "leaderboard.md")).readline()
    assert "loss.temperature" in header and "train.epochs" in header and "train.seed" not in header


def _row(i: int) -> dict:
    return {"student": f"s{i}", "loss": "kl", "test_acc": i / 10, "labels_only_acc": 0.1, "teacher_acc": 0.9,
            "params": 10 * (i + 1)}


def test_concurrent_updates_lose_no_row(tmp_path):
    # (the pool runs update_leaderboard itself, so its processes import pipeline.leaderboard
    # alone, not this module and the test helpers: a third of the time)
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(functools.partial(update_leaderboard, str(tmp_path)), [[_row(i)] for i in range(8)])
    board = json.load(open(tmp_path / "leaderboard.json"))
    assert sorted(r["student"] for r in board) == [f"s{i}" for i in range(8)]
    assert [r["test_acc"] for r in board] == sorted((r["test_acc"] for r in board), reverse=True)
