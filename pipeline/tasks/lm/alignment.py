"""Students with another tokenizer than the teacher's, trained from the same cache.

A token cache records the teacher's tokenizer (``tokenizer.json``, format 5). For a
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) every token id has exact bytes, so a cached
sequence's text is the concatenation of its tokens' bytes and token ``j`` spans bytes
``[ends[j-1], ends[j])``. The student tokenizes that same text (:func:`retokenize`).

**Alignment.** The teacher's row at position ``j`` is its distribution over the token that
starts at byte ``ends[j]``, given the text before it. A student position whose context ends
at the same byte predicts a token starting there too: the two are *aligned* when their
context ends coincide (:func:`aligned_positions`). That covers one-to-one tokens, a teacher
token split into several student tokens (its last piece aligns; the pieces inside it have
no teacher row at their byte) and several teacher tokens merged into one student token (the
student position before the merged token aligns with the teacher position before the first
of them). Student positions with no aligned teacher row train on their labels alone; the
fraction aligned is reported.

**Methods** for turning an aligned teacher row into a target for the student:

- *Vocabulary projection* (``topk_kl`` / ``sampled_kl``): each teacher token id maps to one
  student id (:func:`projection`): the student token with the same bytes where there is one
  (exact), otherwise, with ``student.projection=prefix`` (default), the longest student token
  that is a prefix of the teacher token's bytes: the student's first token of that
  continuation. Several teacher tokens may land on one student id; their probabilities add
  (:func:`project_topk`, :func:`project_sampled`). Teacher tokens with no student id
  (``projection=exact`` and no exact match; a special token the student lacks) join the
  tail: the top-K + tail KL then compares the student's mass outside the kept ids with the
  teacher's outside them. Total probability is preserved exactly.
- *Universal Logit Distillation* (``uld_topk`` / ``uld_sampled``, Boizard et al. 2024): the
  L1 distance between the teacher's and the student's probabilities sorted in decreasing
  order, which needs no vocabulary correspondence at all (:func:`pipeline.losses.uld_loss`).
  Here it is taken at byte-aligned positions (ULD itself pairs positions by index).

Both tokenizers must be byte-level (each token has definite bytes, no normalizer that
changes the text); anything else is refused, naming what was found.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from pipeline.cache.format import SAMPLED_CNT, SAMPLED_IDX, TOPK_IDX, TOPK_VAL
from pipeline.errors import ConfigError, DataError, DataNotFound
from pipeline.representations import map_ids, pad_entries
from pipeline.sequence_stream import SequenceBatch, pad_batch

log = logging.getLogger(__name__)



@functools.cache
def byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each of the 256 bytes is written as one
    printable character; printable Latin-1 bytes as themselves, the rest from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _byte_level(part: dict | None) -> bool:
    if not part:
        return False
    if part.get("type") == "Sequence":
        return any(_byte_level(p) for p in part.get("decoders", part.get("pretokenizers", [])))
    return part.get("type") == "ByteLevel"


def token_bytes(tokenizer_json: str, what: str = "tokenizer") -> list[bytes]:
    """Each token id's bytes, from a ``tokenizers`` JSON: byte-level BPE vocabulary entries
    decoded from the byte alphabet, added (special) tokens as their UTF-8 text."""
    j = json.loads(tokenizer_json)
    model = j.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(j.get("decoder")) or j.get("normalizer"):
        raise ConfigError(f"the {what} is not a byte-level BPE (model {model.get('type')!r}, decoder "
                         f"{(j.get('decoder') or {}).get('type')!r}, normalizer "
                         f"{(j.get('normalizer') or {}).get('type')!r}): aligning two tokenizers by byte spans "
                         "needs both to give every token definite bytes (GPT-2, Llama 3, Qwen, SmolLM style)")
    vocab, added = model["vocab"], j.get("added_tokens") or []
    table = [b""] * (max([*vocab.values(), *(a["id"] for a in added)]) + 1)
    dec = byte_decoder()
    for tok, i in vocab.items():
        try:
            table[i] = bytes(dec[c] for c in tok)
        except KeyError:
            raise ConfigError(f"the {what}'s token {tok!r} (id {i}) has a character outside the byte-level "
                             "alphabet: not a byte-level BPE vocabulary") from None
    for a in added:
        table[a["id"]] = a["content"].encode()
    return table


class TokenBytes:
    """A tokenizer's id -> bytes table, with the lengths as an array."""

    def __init__(self, tokenizer_json: str, what: str = "tokenizer"):
        self.table = token_bytes(tokenizer_json, what)
        self.lengths = np.array([len(b) for b in self.table], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def text(self, ids) -> bytes:
        return b"".join(self.table[i] for i in ids)


def utf8_window(data: bytes) -> tuple[int, int]:
    """The longest run ``data[a:b]`` that decodes as UTF-8, cutting at most a partial
    character at each end (a sequence cut between the byte tokens of one character)."""
    a = 0
    while a < min(len(data), 3) and data[a] & 0xC0 == 0x80:
        a += 1
    for cut in range(4):
        try:
            data[a:len(data) - cut].decode("utf-8")
            return a, len(data) - cut
        except UnicodeDecodeError as e:
            if e.start < len(data) - a - cut - 3:
                raise DataError(f"invalid UTF-8 at byte {a + e.start} of a cached sequence's text") from None
    raise DataError("a cached sequence's text is not UTF-8")


def aligned_positions(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teacher positions, student positions) whose contexts end at the same byte: each
    predicts the token starting there. ``*_ends[j]`` is the byte where token ``j`` ends."""
    _, t, s = np.intersect1d(teacher_ends, student_ends, assume_unique=False, return_indices=True)
    return t.astype(np.int64), s.astype(np.int64)


@dataclass
class StudentTokens:
    """Every cached sequence re-tokenized by the student, and where it meets the teacher.

    Sequence ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``; its aligned pairs are
    ``teacher_pos[pair_offsets[i]:...]`` and ``student_pos[...]`` (positions within the
    sequence); ``lengths`` are the bytes of each student token."""

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    teacher_pos: np.ndarray
    student_pos: np.ndarray
    pair_offsets: np.ndarray

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def pairs(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.pair_offsets[i], self.pair_offsets[i + 1]
        return self.teacher_pos[a:b], self.student_pos[a:b]

    def aligned_fraction(self, first: int, last: int) -> float:
        """Aligned student positions over all student positions, sequences [first, last)."""
        n = self.offsets[last] - self.offsets[first]
        return float((self.pair_offsets[last] - self.pair_offsets[first]) / max(n, 1))

    def predicted_bytes(self, first: int, last: int) -> int:
        """Bytes of the tokens the student predicts (all but each sequence's first)."""
        total = int(self.lengths[self.offsets[first]:self.offsets[last]].sum())
        return total - int(sum(self.lengths[self.offsets[i]] for i in range(first, last)
                               if self.offsets[i + 1] > self.offsets[i]))


def retokenize(data, teacher: TokenBytes, tokenizer, student: TokenBytes, batch: int = 256) -> StudentTokens:
    """The student's tokens for each of ``data``'s sequences (``TokenData``), with the byte
    alignment to the teacher's. Chat caches are refused (their rows are the assistant's
    tokens under the teacher's template; a student would need its own)."""
    from tqdm.auto import tqdm

    if data.positions is not None:
        raise ConfigError("a chat cache (rows at the assistant's tokens) cannot train a student with another "
                         "tokenizer yet: use a text corpus (data.text_column), or the teacher's tokenizer")
    n = len(data.offsets) - 1
    tokens, lengths, counts, tpos, spos, pcounts = [], [], [], [], [], []
    for a in tqdm(range(0, n, batch), desc="student tokens", unit="seq", unit_scale=batch,
                  disable=n < 4 * batch, leave=False):
        texts, windows, ends_t = [], [], []
        for i in range(a, min(a + batch, n)):
            ids = data.sequence(i)
            raw = teacher.text(ids)
            w = utf8_window(raw)
            texts.append(raw[w[0]:w[1]].decode("utf-8"))
            windows.append(w)
            ends_t.append(np.cumsum(teacher.lengths[ids]))
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for j, (ids, w, te) in enumerate(zip(enc, windows, ends_t, strict=True)):
            ids = np.asarray(ids, dtype=np.int64)
            ln = student.lengths[ids] if len(ids) else np.zeros(0, np.int64)
            if int(ln.sum()) != w[1] - w[0]:
                raise DataError(f"the student tokenizer gives sequence {a + j} {int(ln.sum())} bytes of tokens for "
                                 f"its {w[1] - w[0]} bytes of text: it changes the text (a normalizer, an added "
                                 "prefix space?); byte alignment needs a tokenizer that keeps it byte for byte")
            t, s = aligned_positions(te, w[0] + np.cumsum(ln))
            tokens.append(ids)
            lengths.append(ln)
            counts.append(len(ids))
            tpos.append(t)
            spos.append(s)
            pcounts.append(len(t))
    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0, np.int64)

    return StudentTokens(cat(tokens), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), cat(lengths),
                         cat(tpos), cat(spos), np.concatenate([[0], np.cumsum(pcounts)]).astype(np.int64))


# --- vocabulary projection -----------------------------------------------------------------


def projection(teacher: TokenBytes, student: TokenBytes, rule: str = "prefix") -> np.ndarray:
    """Teacher id -> student id (-1: none). ``exact``: the student token with the same bytes;
    ``prefix``: that, else the longest student token that is a prefix of the teacher's."""
    if rule not in ("exact", "prefix"):
        raise ConfigError(f"student.projection={rule!r}: expected exact or prefix")
    by_bytes = {b: i for i, b in enumerate(student.table) if b}
    longest = max((len(b) for b in by_bytes), default=0)
    out = np.full(len(teacher), -1, dtype=np.int64)
    for i, b in enumerate(teacher.table):
        if b in by_bytes:
            out[i] = by_bytes[b]
        elif rule == "prefix":
            for n in range(min(len(b), longest), 0, -1):
                if b[:n] in by_bytes:
                    out[i] = by_bytes[b[:n]]
                    break
    return out


def _merge(keys: np.ndarray, weights: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (rows, K) ``keys`` where ``kept``: a mask of each (row, key)'s first entry and
    the sum of ``weights`` over its entries, placed at that first entry."""
    flat = np.flatnonzero(kept.ravel())
    uniq, first, inverse = np.unique(keys.ravel()[flat], return_index=True, return_inverse=True)
    first_mask = np.zeros(keys.size, dtype=bool)
    first_mask[flat[first]] = True
    total = np.zeros(keys.size, dtype=np.float64)
    total[flat[first]] = np.bincount(inverse, weights=weights.ravel()[flat], minlength=len(uniq))
    return first_mask.reshape(keys.shape), total.reshape(keys.shape)


def project_topk(idx: np.ndarray, val: np.ndarray, lse: np.ndarray, temperature: float,
                 proj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-K rows (teacher ids, logits, logsumexp at ``temperature``) as rows over student
    ids: the probabilities of teacher ids with one student id summed into one entry whose
    value gives that sum (``T * (log p + lse)``), the rest dropped into the tail. The row's
    tail mass is unchanged: total probability is preserved. Also returns which rows keep an
    entry (a row with none is all tail: nothing to distil)."""
    n, k = idx.shape
    sid = map_ids(idx, proj)
    p = np.exp(val.astype(np.float64) / temperature - lse.astype(np.float64)[:, None])
    keys = np.arange(n, dtype=np.int64)[:, None] * (int(proj.max()) + 2) + sid
    first, mass = _merge(keys, p, sid >= 0)
    first &= mass > 0  # a probability that underflowed: nothing to keep
    with np.errstate(divide="ignore"):
        value = temperature * (np.log(mass) + lse.astype(np.float64)[:, None])
    idx, val = pad_entries(sid, value, ~first)
    return idx, val, first.any(1)


def project_sampled(idx: np.ndarray, cnt: np.ndarray, proj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled rows (teacher ids, counts) over student ids: the counts of draws that land on
    one student id added; draws with none (and merged duplicates) get id -1, count 0."""
    n = len(idx)
    sid = map_ids(idx, proj)
    keys = np.arange(n, dtype=np.int64)[:, None] * (int(proj.max()) + 2) + sid
    first, total = _merge(keys, cnt.astype(np.float64), (sid >= 0) & (cnt > 0))
    return np.where(first, sid, -1).astype(np.int32), np.where(first, total, 0).astype(cnt.dtype)


# --- batches on the student's grid -----------------------------------------------------------


class CrossTokenizer:
    """Turns a batch of cached teacher sequences into the student's: its tokens (padded),
    the teacher's rows moved to the aligned student positions (projected onto the student's
    ids with ``proj``; left in teacher ids for ULD, which reads probabilities only), every
    real student token trained on its label, the distillation term on the aligned ones."""

    def __init__(self, tokens: StudentTokens, pad_id: int, proj: np.ndarray | None, temperature: float = 1.0):
        self.tokens, self.pad_id, self.proj, self.temperature = tokens, pad_id, proj, temperature

    def projecting(self, proj: np.ndarray, temperature: float) -> CrossTokenizer:
        """The same alignment, projecting the rows with ``proj`` (how evaluation reads them)."""
        return CrossTokenizer(self.tokens, self.pad_id, proj, temperature)

    def __call__(self, batch: SequenceBatch) -> SequenceBatch:
        st = self.tokens
        ids, attention = pad_batch([st.sequence(i) for i in batch.sequences], self.pad_id)
        width_t, width_s = batch.input_ids.shape[1], ids.shape[1]
        src, dst = [], []
        for b, i in enumerate(batch.sequences):
            t, s = st.pairs(i)
            src.append(b * width_t + t)
            dst.append(b * width_s + s)
        src, dst = np.concatenate(src), np.concatenate(dst)
        has = batch.teacher_mask()[src]
        src, dst = src[has], dst[has]
        teacher = {}
        for name, a in batch.teacher.items():
            out = np.zeros((len(ids) * width_s, *a.shape[1:]), dtype=a.dtype)
            out[dst] = a[src]
            teacher[name] = out
        distil = np.zeros(len(ids) * width_s, dtype=bool)
        distil[dst] = True
        if self.proj is not None and TOPK_IDX in teacher:
            idx, val, has = project_topk(teacher[TOPK_IDX][dst], teacher[TOPK_VAL][dst], teacher["lse"][dst],
                                         self.temperature, self.proj)
            distil[dst[~has]] = False  # no cached id has a student id: labels only there
            teacher[TOPK_IDX] = np.zeros((len(distil), idx.shape[1]), np.int32)
            teacher[TOPK_VAL] = np.zeros((len(distil), idx.shape[1]), np.float32)
            teacher[TOPK_IDX][dst], teacher[TOPK_VAL][dst] = idx, val
        if self.proj is not None and SAMPLED_IDX in teacher:
            sid, cnt = project_sampled(teacher[SAMPLED_IDX][dst], teacher[SAMPLED_CNT][dst], self.proj)
            teacher[SAMPLED_IDX][dst], teacher[SAMPLED_CNT][dst] = sid, cnt
            distil[dst[cnt.sum(1) == 0]] = False  # no draw has a student id: labels only there
        return SequenceBatch(ids, attention, teacher, attention.numpy().astype(bool).ravel(), batch.sequences,
                             distil_mask=distil)


def train_bpe(texts, vocab_size: int, folder: str, special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> None:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` with Hugging Face
    ``tokenizers`` and saved as a tokenizer folder ``AutoTokenizer`` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tmp = f"{folder}.tmp-{os.getpid()}"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special_tokens[0], pad_token=special_tokens[0],
                            bos_token=special_tokens[0]).save_pretrained(tmp)
    os.replace(tmp, folder)


def student_tokenizer(spec_tokenizer: str, data, teacher_json: str, root: str):
    """The student's tokenizer: a folder, or ``bpe:<N>``: a byte-level BPE of N tokens
    trained on the training sequences' text (once; kept under ``<root>/tokenizers/``)."""
    from transformers import AutoTokenizer

    if spec_tokenizer.startswith("bpe:"):
        size = int(spec_tokenizer.split(":", 1)[1])
        a, z = data.sequences["train"]
        h = hashlib.sha256(f"{size}:{data.tokenizer_hash}:{data.content_hash()}".encode()).hexdigest()[:10]
        folder = os.path.join(root, "tokenizers", f"bpe{size}-{h}")
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            teacher = TokenBytes(teacher_json, "teacher's tokenizer")
            texts = (teacher.text(data.sequence(i)).decode("utf-8", errors="ignore") for i in range(a, z))
            train_bpe(texts, size, folder)
            log.info("trained a byte-level BPE of %d tokens on %d training sequences: %s", size, z - a, folder)
        spec_tokenizer = folder
    folder = os.path.expanduser(spec_tokenizer)
    if not os.path.isdir(folder):
        raise DataNotFound(f"student.tokenizer={spec_tokenizer!r}: expected a tokenizer folder "
                                "(tokenizer.json, as save_pretrained writes) or bpe:<vocabulary size>")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


