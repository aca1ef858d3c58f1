"""Corpora the defaults were not tuned on, built offline from what this machine ships: the
quality benchmark's (``bench/quality.py``) data besides the built-in Shakespeare.

- ``python``: the standard library's Python source (``sysconfig``'s stdlib folder, tests
  and IDLE left out), a module per document.
- ``manpages``: Debian's English manual pages, section 1 (``/usr/share/man/man1``; the
  Google Cloud CLI's generated ones left out), their roff source reduced to its text (comments and layout requests dropped, font and
  character escapes replaced), a page per document.
- ``licences``: the licence texts Debian ships (``/usr/share/common-licenses``) and those
  of the installed Python packages (their ``*.dist-info`` folders), a distinct text per
  document (exact copies dropped).

Each is written as JSONL (``{"text": ...}`` a line) for ``data=corpus``. Files are taken in
the order of a hash of their path (a spread over the alphabet and the package tree, the
same on every machine with the same files) until ``chars`` characters, each document cut
at ``per_document`` characters so that no single file fills the corpus.

    .venv/bin/python bench/corpora.py data/quality/corpora     # writes the three files
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator

CHARS = 400_000  # about 100k teacher tokens: the 528 sequences of 128 the benchmark takes, and spare
PER_DOCUMENT = 20_000


def _by_hash(paths: list[str], root: str) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode()).hexdigest())


def python_source() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = re.compile(r"(^|/)(test|tests|idlelib|site-packages|lib2to3/tests)(/|$)")
    paths = [p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if not skip.search(os.path.relpath(p, root))]
    for p in _by_hash(paths, root):
        with open(p, encoding="utf-8", errors="replace") as f:
            yield f.read()


_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "RS", "RE", "Pp", "It", "Bl", "El", "Bd", "Ed"}
_TEXT_MACROS = {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "UR", "MT", "Nm", "Nd", "Fl", "Ar", "Op",
                "Xr", "Pa", "Dv", "Ev", "Cm", "Em", "Sy", "Li", "Ql"}
_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\*?\(..|\\\[[^\]]*\]"), " "),
            (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
            (re.compile(r"\\[&|^%)!]"), ""), (re.compile(r"\\ "), " ")]


def roff_text(source: str) -> str:
    """A manual page's text as man would fill it: comment lines and layout requests dropped,
    the arguments of the text-bearing macros (fonts, tagged paragraphs) kept, text lines
    joined into paragraphs (lines kept as they are between ``.nf`` and ``.fi``), headings on
    their own line, escapes resolved."""
    paragraphs: list[str] = []
    words: list[str] = []
    fill = True

    def flush() -> None:
        if words:
            paragraphs.append(" ".join(words))
            words.clear()

    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            rest = rest.replace('"', "").strip()
            if macro in ("nf", "EX"):
                flush()
                fill = False
            elif macro in ("fi", "EE"):
                fill = True
            elif macro in _HEADINGS:
                flush()
                paragraphs.append(rest)
            elif macro in _BREAKS:
                flush()
                if rest and macro in ("TP", "IP", "It"):
                    words.append(rest)
            elif macro in _TEXT_MACROS and rest:
                words.append(rest)
            continue
        if not fill:
            paragraphs.append(line)
        elif line.strip():
            words.append(line.strip())
        else:
            flush()
    flush()
    return "\n".join(p for p in paragraphs if p.strip()).strip()


def manual_pages() -> Iterator[str]:
    root = "/usr/share/man/man1"
    # (the Google Cloud CLI's 16,631 generated pages, where it is installed, would be most of them)
    paths = [p for p in glob.glob(os.path.join(root, "*.1*")) if not os.path.basename(p).startswith("gcloud")]
    if not paths:
        raise FileNotFoundError(f"no manual pages in {root} (Debian's `man-db`/`manpages` packages put them there)")
    for p in _by_hash(paths, root):
        opener = gzip.open if p.endswith(".gz") else open
        try:
            with opener(p, "rt", encoding="utf-8", errors="replace") as f:
                text = roff_text(f.read())
        except (OSError, EOFError):
            continue  # a dangling link or a damaged file: not a page
        if text:
            yield text


def licence_texts() -> Iterator[str]:
    common = "/usr/share/common-licenses"
    packages = sysconfig.get_paths()["purelib"]
    paths = [p for p in glob.glob(os.path.join(common, "*")) if os.path.isfile(p)]
    paths += [p for p in glob.glob(os.path.join(packages, "*.dist-info", "**", "*"), recursive=True)
              if os.path.isfile(p) and re.search(r"(licen[cs]e|copying|notice)", os.path.basename(p), re.I)]
    if not paths:
        raise FileNotFoundError(f"no licence texts in {common} or in {packages}/*.dist-info")
    seen = set()
    for p in _by_hash(paths, "/"):
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        digest = hashlib.sha1(text.encode()).digest()
        if text and digest not in seen:
            seen.add(digest)
            yield text


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"python": python_source, "manpages": manual_pages,
                                                   "licences": licence_texts}


def build(name: str, path: str, chars: int = CHARS, per_document: int = PER_DOCUMENT) -> dict:
    """Writes corpus ``name`` to ``path`` (JSONL, renamed into place when whole); returns its
    counts. Fewer than ``chars`` characters on this machine is an error, not a smaller corpus."""
    total, docs = 0, 0
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for text in CORPORA[name]():
            text = text[:per_document]
            f.write(json.dumps({"text": text}) + "\n")
            total, docs = total + len(text), docs + 1
            if total >= chars:
                break
    if total < chars:
        os.remove(tmp)
        raise ValueError(f"corpus {name!r}: only {total} characters on this machine, {chars} wanted")
    os.replace(tmp, path)
    return {"documents": docs, "characters": total}


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "data/quality/corpora"
    for corpus in CORPORA:
        print(corpus, build(corpus, os.path.join(out, f"{corpus}.jsonl")))
