"""The quality benchmark's corpora (bench/corpora.py): manual pages reduced to their text,
and a corpus this machine cannot fill refused, not written smaller."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import corpora  # noqa: E402

PAGE = r""".\" a comment
.TH CHATTR 1 "2024" "E2fsprogs"
.SH NAME
chattr \- change file attributes
.SH SYNOPSIS
.B chattr
[
.B \-RVf
]
.I files...
.PP
The letters
\fBaA\fR select
the attributes.
.nf
  kept  as
  written
.fi
.TP
.B \-R
Recursively\(emchange.
"""


def test_roff_text_fills_paragraphs_and_drops_requests():
    assert corpora.roff_text(PAGE).split("\n") == [
        "NAME", "chattr - change file attributes", "SYNOPSIS", "chattr [ -RVf ] files...",
        "The letters aA select the attributes.", "  kept  as", "  written", "-R Recursively change."]


def test_build_writes_jsonl_and_refuses_a_short_corpus(tmp_path, monkeypatch):
    monkeypatch.setitem(corpora.CORPORA, "tiny", lambda: iter(["abc" * 10, "de" * 40]))
    out = tmp_path / "c" / "tiny.jsonl"
    assert corpora.build("tiny", str(out), chars=50, per_document=40) == {"documents": 2, "characters": 70}
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["abc" * 10, "de" * 20]
    with pytest.raises(ValueError, match="only 70 characters"):
        corpora.build("tiny", str(tmp_path / "short.jsonl"), chars=1000, per_document=40)
    assert not (tmp_path / "short.jsonl").exists()
    assert not (tmp_path / "short.jsonl.tmp").exists()
