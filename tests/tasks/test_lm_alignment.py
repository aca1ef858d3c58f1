"""Cross-tokenizer distillation: byte spans, alignment, the vocabulary projection and ULD,
against hand-made cases and plain references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import LMTeacherConfig, conversions_home
from pipeline.losses import sampled_kl_loss, topk_kl_loss, torch_uld, uld_loss
from pipeline.tasks.lm.alignment import (
    TokenBytes,
    aligned_positions,
    byte_decoder,
    project_sampled,
    project_topk,
    projection,
    train_bpe,
    utf8_window,
)

TEXT = ("Thou art  more lovely and more temperate:\n\tRough winds do shake — naïve café, "
        "日本語のテキスト, emoji 🎭🙂, tabs\t\tand   spaces.\n\n")


@pytest.fixture(scope="module")
def smollm2():
    from pipeline.tasks.lm.models import load_tokenizer

    return load_tokenizer(LMTeacherConfig(name="smollm2"), conversions_home())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, smollm2):
    folder = str(tmp_path_factory.mktemp("tok") / "bpe")
    train_bpe([TEXT * 3, "More lovely winds, more temperate spaces."], 400, folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def table(tok) -> TokenBytes:
    return TokenBytes(tok.backend_tokenizer.to_str())


def byte_table(pieces: list[bytes]) -> TokenBytes:
    """A byte-level BPE tokenizer JSON whose vocabulary is exactly ``pieces``."""
    enc = {b: c for c, b in byte_decoder().items()}
    vocab = {"".join(enc[x] for x in p): i for i, p in enumerate(pieces)}
    return TokenBytes(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                  "decoder": {"type": "ByteLevel"}, "normalizer": None, "added_tokens": []}))


def test_token_bytes_reproduce_the_text_byte_for_byte(smollm2, bpe):
    for tok in (smollm2, bpe):
        t = table(tok)
        ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        assert t.text(ids) == TEXT.encode()
        assert int(t.lengths[ids].sum()) == len(TEXT.encode())
    # a special token is its own text
    t = table(smollm2)
    assert t.table[smollm2.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"


def test_a_tokenizer_that_is_not_byte_level_is_refused():
    bad = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}, "normalizer": None}
    with pytest.raises(ValueError, match="not a byte-level BPE .*WordPiece"):
        TokenBytes(json.dumps(bad), "student.tokenizer=x")
    nfc = {"model": {"type": "BPE", "vocab": {"a": 0}}, "decoder": {"type": "ByteLevel"},
           "normalizer": {"type": "NFC"}}
    with pytest.raises(ValueError, match="normalizer 'NFC'"):
        TokenBytes(json.dumps(nfc))


def test_alignment_by_byte_spans_on_hand_split_strings():
    """'Hello world' split two ways: teacher Hel|lo| wor|ld, student H|ello| world. The
    contexts that end at the same byte (5: 'Hello', 11: the whole) are aligned; the
    teacher's ' wor' and the student's 'H' end where the other has no boundary."""
    t_pieces, s_pieces = [b"Hel", b"lo", b" wor", b"ld"], [b"H", b"ello", b" world"]
    t_ends, s_ends = np.cumsum([len(p) for p in t_pieces]), np.cumsum([len(p) for p in s_pieces])
    t, s = aligned_positions(t_ends, s_ends)
    assert t.tolist() == [1, 3] and s.tolist() == [1, 2]
    # multi-byte UTF-8 split inside a character by the teacher (byte tokens), whole in the
    # student; whitespace merged by the student ('  ' one token) and split by the teacher
    text = "é  x".encode()  # c3 a9 20 20 78
    t_pieces = [text[:1], text[1:2], text[2:3], text[3:4], text[4:]]  # \xc3 | \xa9 | ' ' | ' ' | x
    s_pieces = [text[:2], text[2:4], text[4:]]  # é | '  ' | x
    t, s = aligned_positions(np.cumsum([len(p) for p in t_pieces]), np.cumsum([len(p) for p in s_pieces]))
    assert t.tolist() == [1, 3, 4] and s.tolist() == [0, 1, 2]  # after 'é', after '  ', the end


def test_a_real_student_tokenizer_aligns_wherever_both_have_a_boundary(smollm2, bpe):
    from pipeline.tasks.lm.alignment import retokenize
    from pipeline.tasks.lm.text import TokenData

    teacher, student = table(smollm2), table(bpe)
    seqs = [np.asarray(smollm2(x, add_special_tokens=False)["input_ids"]) for x in (TEXT, TEXT[7:90], TEXT[40:])]
    seqs.append(seqs[0][5:30])  # cut in the middle of the text, possibly inside a character
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    data = TokenData(np.concatenate(seqs), offsets, {"train": (0, 3), "heldout": (3, 4)}, "x")
    st = retokenize(data, teacher, bpe, student)
    for i, ids in enumerate(seqs):
        raw = teacher.text(ids)
        a, b = utf8_window(raw)
        sid = st.sequence(i)
        assert student.text(sid) == raw[a:b]
        t_ends = np.cumsum(teacher.lengths[ids])
        s_ends = a + np.cumsum(student.lengths[sid])
        tp, sp = st.pairs(i)
        assert (t_ends[tp] == s_ends[sp]).all()
        assert len(tp) == len(set(t_ends.tolist()) & set(s_ends.tolist())) > 0  # every shared boundary
    assert 0 < st.aligned_fraction(0, 3) < 1


def test_utf8_window_cuts_partial_characters_at_the_ends():
    raw = "aé日🎭".encode()
    assert utf8_window(raw) == (0, len(raw))
    assert utf8_window(raw[2:]) == (1, len(raw) - 2)  # a lone continuation byte of 'é' leads
    assert utf8_window(raw[:-1]) == (0, len(raw) - 4)  # 3 of the emoji's 4 bytes trail
    with pytest.raises(ValueError, match="invalid UTF-8"):
        utf8_window(b"ab\xff\xfecdefgh")


def test_projection_is_exact_where_strings_coincide_else_the_longest_prefix():
    teacher = byte_table([b"the", b" the", b" thou", b"ght", b"\xc3", "é".encode()])
    student = byte_table([b"th", b" the", b" th", b"e", b"\xc3", b"\xa9"])
    assert projection(teacher, student, "exact").tolist() == [-1, 1, -1, -1, 4, -1]
    assert projection(teacher, student, "prefix").tolist() == [0, 1, 2, -1, 4, 4]


def random_rows(rng, n, k, width):
    logits = rng.standard_normal((n, width)) * 3
    logits[0, :] = 0.0  # ties everywhere
    logits[1, 5] = 60.0  # one token holds all the mass
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(logits, idx, 1)
    return logits, idx.astype(np.int32), val.astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_topk_projection_preserves_probability_mass_and_sums_collisions(temperature):
    rng = np.random.default_rng(0)
    n, k, width, vs = 6, 8, 40, 12
    logits, idx, val = random_rows(rng, n, k, width)
    lse = np.log(np.exp(logits / temperature).sum(1))
    proj = rng.integers(-1, vs, size=width)  # collisions and unmapped ids
    proj[idx[2]] = 3  # a row whose every entry lands on one student id
    proj[idx[3]] = -1  # a row with none
    pidx, pval, has = project_topk(idx, val, lse.astype(np.float32), temperature, proj)
    p = np.exp(val / temperature - lse[:, None])
    q = np.exp(pval.astype(np.float64) / temperature - lse[:, None])
    kept = pidx >= 0
    assert np.isneginf(pval[~kept]).all()
    for r in range(n):
        want = {}
        for j in range(k):
            if proj[idx[r, j]] >= 0:
                want[proj[idx[r, j]]] = want.get(proj[idx[r, j]], 0.0) + p[r, j]
        got = {int(i): float(x) for i, x, m in zip(pidx[r], q[r], kept[r], strict=True) if m}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=1e-5)
        # total mass: projected entries + the tail (the original tail and every dropped entry) = 1
        dropped = p[r].sum() - sum(want.values())
        np.testing.assert_allclose(q[r][kept[r]].sum() + (1 - p[r].sum()) + dropped, 1.0, rtol=1e-6)
        assert len(set(pidx[r][kept[r]].tolist())) == kept[r].sum()  # distinct student ids
    assert kept[2].sum() == 1 and not kept[3].any()
    assert has.tolist() == [kept[r].any() for r in range(n)] and not has[3]
    # the top-K + tail KL over the projected rows equals KL over (student ids kept + one tail
    # bucket) computed by hand from the merged distribution
    s = torch.from_numpy(rng.standard_normal((n, vs)).astype(np.float32))
    got = topk_kl_loss(s, pidx, pval, lse.astype(np.float32), temperature=temperature, reduction="none")
    qs = torch.softmax(s.double() / temperature, 1).numpy()
    for r in np.flatnonzero(has):  # (a row with nothing kept is left out of the distillation term)
        ids = [int(i) for i, m in zip(pidx[r], kept[r], strict=True) if m]
        pk = np.exp(pval[r][kept[r]].astype(np.float64) / temperature - lse[r])
        pt, qt = 1 - pk.sum(), 1 - qs[r, ids].sum()
        want = (pk * (np.log(pk) - np.log(qs[r, ids]))).sum() + (pt * (np.log(pt) - np.log(qt)) if pt > 1e-12 else 0)
        np.testing.assert_allclose(got[r].item(), temperature**2 * want, rtol=2e-4, atol=1e-5)


def test_the_sampled_projection_adds_the_counts_of_draws_that_meet():
    idx = np.array([[4, 7, 9, -1], [1, 2, 3, 5]], np.int32)
    cnt = np.array([[5, 2, 1, 0], [3, 3, 1, 1]], np.uint16)
    proj = np.array([0, 6, 6, -1, 2, 6, 0, 2, 0, -1])
    sid, c = project_sampled(idx, cnt, proj)
    got = [{int(i): int(x) for i, x in zip(sid[r], c[r], strict=True) if x} for r in range(2)]
    assert got == [{2: 7}, {6: 7}]  # 4 and 7 both map to 2; 9 has none; 1, 2 and 5 map to 6, 3 to none
    assert (sid[c == 0] == -1).all() and c.dtype == np.uint16
    s = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    loss = sampled_kl_loss(s, sid, c, np.zeros(2, np.float32), reduction="none")
    logq = torch.log_softmax(s, 1)
    torch.testing.assert_close(loss, torch.stack([-logq[0, 2], -logq[1, 6]]))


def test_uld_equals_the_sorted_l1_of_full_distributions_when_k_covers_the_vocabulary():
    rng = np.random.default_rng(1)
    n, v = 5, 9
    t = rng.standard_normal((n, v)) * 2
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    s = torch.from_numpy(rng.standard_normal((n, v + 4))).requires_grad_()  # the student's vocabulary is wider
    got = torch_uld(s, torch.from_numpy(-np.sort(-p, 1)), torch.zeros(n, dtype=torch.float64), 1.0)
    q = torch.softmax(s.detach(), 1).numpy()
    padded = np.concatenate([-np.sort(-p, 1), np.zeros((n, 4))], 1)
    want = np.abs(padded - -np.sort(-q, 1)).sum(1)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6)
    # through the loss: masked rows cost nothing and get no gradient; the gradient matches
    # float64 finite differences
    mask = np.array([1, 0, 1, 1, 0], bool)
    loss = uld_loss(s, -np.sort(-p, 1), np.zeros(n), mask=mask, coef=2.0)
    np.testing.assert_allclose(loss.item(), 2 * want[mask].mean(), rtol=1e-6)
    loss.backward()
    assert (s.grad[~torch.from_numpy(mask)] == 0).all() and s.grad[torch.from_numpy(mask)].abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: torch_uld(x, torch.from_numpy(-np.sort(-p, 1))[:, :4],
                                                        torch.from_numpy(1 - (-np.sort(-p, 1))[:, :4].sum(1)), 2.0),
                                    (torch.from_numpy(rng.standard_normal((n, v))).requires_grad_(),))
