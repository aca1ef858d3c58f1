"""task=lm documents: the built-in plays or a corpus on disk (save_to_disk, JSONL, Parquet,
Arrow), tokenized in a batched map into sequences; bad corpora get one clear error."""

from __future__ import annotations

import glob
import json
import os

import datasets
import pytest

from pipeline.tasks.lm.models import load_tokenizer
from pipeline.tasks.lm.text import load_tokens, play_texts
from tests.support import compose_config, error_line, run_cli

SIZES = ["task=lm", "data=corpus", "data.seq_len=32", "data.test_size=4"]


def _documents(n: int = 40) -> list[str]:
    """Paragraphs of the first play: real text of uneven lengths."""
    paragraphs = [p.strip() for p in play_texts()[0].split("\n\n") if len(p.split()) >= 3]
    return paragraphs[:n]


@pytest.fixture(scope="module")
def tokenizer():
    cfg = compose_config("task=lm")
    return load_tokenizer(cfg.teacher, cfg.paths.conversions)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same documents as JSONL, Parquet, a save_to_disk folder and a folder of Parquet parts."""
    root = tmp_path_factory.mktemp("corpora")
    docs = datasets.Dataset.from_dict({"body": _documents(), "id": list(range(40))})
    with open(root / "docs.jsonl", "w") as f:
        for row in docs:
            f.write(json.dumps(row) + "\n")
    docs.to_parquet(str(root / "docs.parquet"))
    docs.save_to_disk(str(root / "saved"))
    os.makedirs(root / "parts")
    docs.select(range(20)).to_parquet(str(root / "parts" / "ignored.txt"))  # not a corpus file: skipped
    for i, part in enumerate((docs.select(range(20)), docs.select(range(20, 40)))):
        part.to_parquet(str(root / "parts" / f"part-{i}.parquet"))
    return root


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.parquet", "saved", "parts"])
def test_every_corpus_format_gives_the_same_sequences(corpora, tokenizer, tmp_path, name):
    cfg = compose_config(*SIZES, f"data.path={corpora / name}", "data.text_column=body")
    data = load_tokens(cfg.data, str(tmp_path), tokenizer)
    want = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in _documents()]
    pieces = [w[a:a + 32] for w in want for a in range(0, len(w), 32) if len(w[a:a + 32]) >= 2]
    got = sorted(data.sequence(i).tolist() for i in range(len(data.offsets) - 1))
    assert got == sorted(pieces)  # every sequence once, none invented, none lost
    assert data.sequences["heldout"][1] - data.sequences["heldout"][0] == 4
    again = load_tokens(cfg.data, str(tmp_path), tokenizer)  # reused, not rebuilt
    assert again.content_hash() == data.content_hash()
    assert len(glob.glob(str(tmp_path / "datasets" / "corpus-*"))) == 1


def test_a_corpus_without_the_text_column_names_its_columns(corpora, tokenizer, tmp_path):
    cfg = compose_config(*SIZES, f"data.path={corpora / 'docs.parquet'}", "data.text_column=text")
    with pytest.raises(ValueError, match=r"no text column 'text'; its columns are \['body', 'id'\]: set "
                                         r"data.text_column"):
        load_tokens(cfg.data, str(tmp_path), tokenizer)


def test_empty_documents_are_skipped_and_counted(tokenizer, tmp_path, caplog):
    docs = _documents(10)
    docs[2], docs[6] = None, "   "
    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = compose_config(*SIZES, f"data.path={path}")
    with caplog.at_level("INFO"):
        data = load_tokens(cfg.data, str(tmp_path / "root"), tokenizer)
    assert "skipped 2 document(s) with no text in column 'text' (the first: row 2)" in caplog.text
    want = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs if d and d.strip()]
    pieces = [w[a:a + 32] for w in want for a in range(0, len(w), 32) if len(w[a:a + 32]) >= 2]
    assert sorted(data.sequence(i).tolist() for i in range(len(data.offsets) - 1)) == sorted(pieces)


def test_a_malformed_jsonl_line_is_one_line_naming_the_file_and_line(tmp_path):
    lines = [json.dumps({"text": d}) for d in _documents(10)]
    lines[4] = '{"text": "a quote never closed'
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    line = error_line(run_cli(tmp_path / "root", *SIZES, f"data.path={path}", "stage=1", small=False, code=1))
    assert f"DataError: {path}, line 5: not valid JSON" in line and "fix or remove that line" in line


def test_the_default_held_out_split_fits_a_small_corpus(tokenizer, tmp_path, caplog):
    """30 conversations, one sequence each: the held-out split is data.test_fraction of them
    (5%: 2), not a fixed count larger than the corpus."""
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _chats(30)))
    cfg = compose_config("task=lm", "data=corpus", f"data.path={path}", "data.chat_column=messages",
                         "data.seq_len=512")
    with caplog.at_level("INFO"):
        data = load_tokens(cfg.data, str(tmp_path), tokenizer)
    assert data.sequences == {"train": (0, 28), "heldout": (28, 30)}
    assert "holding out 2 of 30 sequences (data.test_fraction=0.05" in caplog.text


def test_a_path_that_is_no_corpus_says_what_is_expected(tmp_path, tokenizer):
    (tmp_path / "notes.txt").write_text("hello")
    cfg = compose_config(*SIZES, f"data.path={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"expected a save_to_disk folder, or .jsonl / .parquet / .arrow"):
        load_tokens(cfg.data, str(tmp_path), tokenizer)


@pytest.mark.slow  # make test-all
def test_a_parquet_corpus_goes_through_all_three_stages(corpora, tmp_path):
    """Your documents instead of the plays: the same engine, the same stages, by the CLI."""
    out = run_cli(tmp_path, *SIZES, f"data.path={corpora / 'docs.parquet'}", "data.text_column=body", "cache.k=8",
                  "cache.samples=4", "train.steps=2", "train.batch_size=2", "lm.eval_batch_size=2",
                  "lm.variants=[labels,topk_kl,sampled_kl]", small=False)
    assert "| causal_lm | topk_kl | 52 |" in out.stdout and "| teacher |" in out.stdout
    (results,) = glob.glob(str(tmp_path / "runs" / "*" / "results.json"))
    rows = json.load(open(results))["students"]
    assert [r["variant"] for r in rows] == ["labels", "topk_kl", "sampled_kl"]
    assert all(r["steps"] == 2 and r["heldout_tokens"] > 0 for r in rows)


def _chats(n: int = 12) -> list[list[dict]]:
    """Conversations made of the play's lines: a user asks, the assistant answers (twice in
    some), one with a system prompt, one with a multi-byte character."""
    lines = [p.replace("\n", " ") for p in _documents(3 * n)]
    chats = []
    for i in range(n):
        chat = [{"role": "user", "content": lines[3 * i]}, {"role": "assistant", "content": lines[3 * i + 1]}]
        if i % 3 == 0:
            chat += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": lines[3 * i + 2]}]
        chats.append(chat)
    chats[1] = [{"role": "system", "content": "Answer in verse."}, *chats[1]]
    chats[2][1]["content"] += " Café ☕"
    return chats


def test_a_chat_corpus_caches_and_trains_on_assistant_tokens_only(tokenizer, tiny_lm, tmp_path):
    """A JSONL chat corpus through all three stages by the CLI. The cache holds one row per
    position that predicts an assistant token: decoding the predicted tokens of each sequence
    gives exactly the assistant turns as SmolLM2's template renders them (content, then
    <|im_end|> and a newline), and each row holds the teacher's logsumexp at its position."""
    import numpy as np
    import torch

    from pipeline.cache import open_cache
    from pipeline.cache.format import LSE
    from pipeline.tasks.lm import scored_positions, teacher_logits
    from pipeline.tasks.lm.models import load_teacher

    chats = _chats()
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for i, chat in enumerate(chats):
            f.write(json.dumps({"id": i, "messages": chat}) + "\n")
    args = ["task=lm", "data=corpus", f"data.path={path}", "data.chat_column=messages", "data.seq_len=512",
            "data.test_size=2", f"paths.root={tmp_path}", "cache.k=8", "cache.samples=4", "train.steps=2",
            "train.batch_size=2", "lm.eval_batch_size=2", "lm.variants=[labels,topk_kl]", *tiny_lm]
    run_cli(tmp_path, *args, small=False)
    cfg = compose_config(*args)
    data = load_tokens(cfg.data, str(tmp_path), tokenizer)
    (cache,) = glob.glob(str(tmp_path / "caches" / "*"))
    reader = open_cache(cache)
    assert reader.positions is not None and reader.manifest.rows == len(data.positions) < len(data.tokens)
    expected = sorted(m["content"] + "<|im_end|>\n" for c in chats for m in c if m["role"] == "assistant")
    runs = []
    for i in range(reader.manifest.sequences):
        s, p = data.sequence(i), scored_positions(data, i)
        assert np.array_equal(p, data.row_positions(i))  # every cached position has its next token here
        for run in np.split(p + 1, np.flatnonzero(np.diff(p) != 1) + 1):
            runs.append(tokenizer.decode(s[run].tolist(), clean_up_tokenization_spaces=False))
    assert sorted(runs) == expected
    teacher = load_teacher(cfg.teacher, cfg.paths.conversions)
    lse = np.asarray(reader.arrays[LSE][:, 0])
    for i in (0, 1):
        with torch.no_grad():
            logits = teacher_logits(teacher.model, [data.sequence(i)], teacher.pad_id, torch.device("cpu"))[0].float()
            logits = logits[:len(data.sequence(i))]
        direct = torch.logsumexp(logits, -1).numpy()
        a, b = reader.offsets[i], reader.offsets[i + 1]
        assert np.abs(lse[a:b] - direct[data.row_positions(i)]).max() < 1e-3
        assert np.abs(lse[a:b] - direct[data.row_positions(i) + 1]).mean() > 0.1  # off by one is told apart
    results = json.load(open(glob.glob(str(tmp_path / "runs" / "*" / "results.json"))[0]))
    held = sum(len(scored_positions(data, i)) for i in range(*data.sequences["heldout"]))
    assert all(r["heldout_tokens"] == held for r in results["students"])


@pytest.mark.parametrize("chat, error", [
    ([{"role": "user", "content": "hello"}], r"conversation 3 of the corpus has no assistant turn"),
    ([{"role": "user", "text": "hello"}], r"conversation 3 of the corpus is not a list of \{role, content\}"),
])
def test_a_bad_conversation_is_named(tokenizer, tmp_path, chat, error):
    chats = _chats(6)
    chats[3] = chat
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    cfg = compose_config(*SIZES, f"data.path={path}", "data.chat_column=messages")
    with pytest.raises(ValueError, match=error):
        load_tokens(cfg.data, str(tmp_path), tokenizer)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _chats(6)))
    cfg = compose_config(*SIZES, f"data.path={path}", "data.chat_column=messages")
    bare = tokenizer.__class__.from_pretrained(str(_save(tokenizer, tmp_path)))
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"the teacher's tokenizer has no chat template"):
        load_tokens(cfg.data, str(tmp_path), bare)


def _save(tokenizer, tmp_path):
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(str(folder))
    return folder
