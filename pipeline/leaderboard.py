"""One leaderboard per cache: every student trained from it, as ``leaderboard.json`` (a
list of rows), ``leaderboard.md`` and ``leaderboard.png`` (test accuracy against parameter
count, the teacher as a line, each student's labels-only baseline beside it).

Updated as each run of a sweep finishes; concurrent runs serialise on an exclusive file
lock, and each file is replaced whole, so a reader never sees half a leaderboard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os

from pipeline.cache.storage import write_file_atomic

log = logging.getLogger(__name__)



def row_key(row: dict) -> str:
    """A row's identity: the student's name and the hash of everything that defines it
    (architecture, loss and its settings, training settings, seed); rows written before
    keys existed fall back to (student, loss)."""
    return row.get("key") or f"{row['student']}|{row['loss']}"


@contextlib.contextmanager
def _locked(folder: str):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_leaderboard(folder: str, rows: list[dict]) -> list[dict]:
    """Add ``rows``, each replacing the row of the same student (same key: same settings);
    rewrite every view; return the board."""
    with _locked(folder):
        path = os.path.join(folder, "leaderboard.json")
        board = json.load(open(path)) if os.path.exists(path) else []
        keys = {row_key(r) for r in rows}
        board = [r for r in board if row_key(r) not in keys] + rows
        board.sort(key=lambda r: -r["test_acc"])
        write_file_atomic(path, json.dumps(board, indent=2).encode())
        write_file_atomic(os.path.join(folder, "leaderboard.md"), format_board(board).encode())
        plot_board(board, os.path.join(folder, "leaderboard.png"))
    log.info("leaderboard: %s (%d rows)", path, len(board))
    return board


def varying_settings(board: list[dict]) -> list[str]:
    """The settings whose values differ between rows (shown as columns; the rest are equal)."""
    names = sorted({k for r in board for k in r.get("settings", {})})
    return [k for k in names if len({json.dumps(r.get("settings", {}).get(k), sort_keys=True) for r in board}) > 1
            and k not in ("loss.distance",)]


def format_board(board: list[dict]) -> str:
    extra = varying_settings(board)
    lines = ["| # | student | loss | " + "".join(f"{k} | " for k in extra)
             + "test acc | labels-only acc | gain | teacher acc | params |",
             "|---:|---|---|" + "---|" * len(extra) + "---:|---:|---:|---:|---:|"]
    for i, r in enumerate(board, 1):
        cells = "".join(f"{r.get('settings', {}).get(k, '-')} | " for k in extra)
        lines.append(f"| {i} | {r['student']} | {r['loss']} | {cells}{r['test_acc']:.4f} | "
                     f"{r['labels_only_acc']:.4f} | {100 * (r['test_acc'] - r['labels_only_acc']):+.1f} pt | "
                     f"{r['teacher_acc']:.4f} | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def plot_board(board: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in sorted({r["loss"] for r in board}):
        rs = [r for r in board if r["loss"] == loss]
        ax.scatter([r["params"] for r in rs], [r["test_acc"] for r in rs], label=f"distilled ({loss})", zorder=3)
    base = {(r["student"], r["params"]): r["labels_only_acc"] for r in board}
    ax.scatter([p * 1.15 for _, p in base], list(base.values()), marker="x", c="gray", label="labels only", zorder=3)
    for (name, p), acc in base.items():
        ax.annotate(name, (p, acc), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if board:
        ax.axhline(board[0]["teacher_acc"], color="k", ls="--", lw=1, label="teacher")
    ax.set(xscale="log", xlabel="student parameters", ylabel="test accuracy", title="students from one cache")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + f".tmp-{os.getpid()}.png", dpi=100)
    plt.close(fig)
    os.replace(path + f".tmp-{os.getpid()}.png", path)
