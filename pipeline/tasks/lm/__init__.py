"""The language-model task: a causal LM teacher over token sequences, one cache row per
real token (padding is never cached, ``offsets`` map sequences to rows), causal LM
students trained from the cache without the teacher.

Capture: shards are fixed ranges of token rows, so a sequence can straddle two shards;
each shard runs the teacher over every sequence it overlaps and keeps its own rows (at
most one sequence per shard boundary is computed twice).

Students: each variant (``lm.variants``) trains the same student from the same
initialisation for the same steps on the same sequence order: ``labels`` on next-token
labels alone, ``topk_kl:K`` on the first K cached logits + a tail bucket, ``sampled_kl``
from the cached draws, each ``alpha * CE + lam * D`` under the padding mask. Evaluation
on the held-out sequences: perplexity, and KL(teacher || student) over the cached
top-K + tail at T=1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import CacheReader, Storage, cache_key, fingerprint_fields, make_fingerprint
from pipeline.cache import open_cache as open_cache_at
from pipeline.cache.fingerprint import layout_settings
from pipeline.capture import plan_manifest
from pipeline.config import DataSource, StudentArch
from pipeline.device import choose_device
from pipeline.distances import DISTANCES
from pipeline.errors import CacheError, ConfigError
from pipeline.fused_head import FUSED_DISTANCES
from pipeline.losses import teacher_arrays
from pipeline.sequence_stream import SequenceStream
from pipeline.students import Fit, StudentRun, student_identity
from pipeline.tasks.base import Task
from pipeline.tasks.lm.alignment import (
    CrossTokenizer,
    StudentTokens,
    TokenBytes,
    projection,
    retokenize,
    student_tokenizer,
)
from pipeline.tasks.lm.evaluation import (  # noqa: F401 (the task's public names)
    TEACHER_EVAL,
    bits_per_byte,
    evaluate_student,
    format_lm_results,
    heldout_bytes,
    read_teacher_eval,
    scored_positions,
    teacher_heldout_nll,
)
from pipeline.tasks.lm.models import (
    LMTeacher,
    build_student,
    load_teacher,
    load_tokenizer,
    pad_id,
    student_weights,
    teacher_config,
    teacher_identity,
    teacher_shapes,
    tokenizer_hash,
)
from pipeline.tasks.lm.objective import (  # noqa: F401
    Variant,
    bytes_per_token,
    fused_objective,
    map_batch,
    next_token_nll,
    output_head,
    prepare_batch,
    sequence_loss,
    sequence_objective,
    student_logits,
    to_student,
    vocab_map,
)
from pipeline.tasks.lm.rows import (  # noqa: F401
    TEACHER_WIDTHS,
    TokenRows,
    pack_sequences,
    padded_width,
    teacher_logits,
)
from pipeline.tasks.lm.text import TokenData, load_tokens
from pipeline.training import joined_group

log = logging.getLogger(__name__)

LM_TEACHERS = ("smollm2", "hf_causal_lm")
# what a token cache's sparse rows give (full vocabulary rows train no LM variant)
LM_DISTANCES = tuple(n for n, d in DISTANCES.items() if d.reads != "full")


class LanguageModel(Task):
    name = "lm"

    @staticmethod
    def validate(cfg, p: list[str]) -> None:
        if cfg.teacher.name not in LM_TEACHERS:
            p.append(f"teacher.name={cfg.teacher.name!r}: task=lm teachers are {list(LM_TEACHERS)}")
        if cfg.teacher.name == "hf_causal_lm" and not cfg.teacher.path:
            p.append("teacher=hf_causal_lm needs teacher.path: a folder with a Hugging Face causal LM "
                     "(config.json + weights, or a .gguf named by teacher.gguf_file)")
        if cfg.data.source not in (DataSource.shakespeare, DataSource.corpus):
            p.append(f"data.source={cfg.data.source.value}: task=lm reads text: data=shakespeare (built in) or "
                     "data=corpus data.path=<your corpus>")
        bad = [k for k, s in cfg.student.items() if s.arch is not StudentArch.causal_lm]
        if bad:
            p.append(f"students {bad} are not causal LMs: task=lm trains student=causal_lm")
        for k, s in cfg.student.items():
            if s.init.value == "teacher_layers" and (s.path or not s.layers):
                p.append(f"student.{k}: init=teacher_layers takes the teacher's layers, listed in "
                         f"student.{k}.layers=[...] (got {list(s.layers)}), and no path (got {s.path!r})")
        if cfg.loss.distance.value not in LM_DISTANCES:
            p.append(f"loss.distance={cfg.loss.distance.value}: task=lm trains with {', '.join(LM_DISTANCES)}")
        for k, s in cfg.student.items():
            if s.tokenizer and s.tokenizer.startswith("bpe:") and not s.tokenizer[4:].isdigit():
                p.append(f"student.{k}.tokenizer={s.tokenizer!r}: bpe:<vocabulary size>, e.g. bpe:8000")
        if cfg.teacher.batch_size <= 0:
            p.append(f"teacher.batch_size={cfg.teacher.batch_size}: must be > 0 (sequences per forward)")
        if cfg.data.seq_len < 2:
            p.append(f"data.seq_len={cfg.data.seq_len}: must be >= 2 (a sequence predicts its next tokens)")
        if cfg.data.train_size < 0:
            p.append(f"data.train_size={cfg.data.train_size}: must be >= 0 (0: every sequence not held out)")
        if cfg.data.test_size < 0:
            p.append(f"data.test_size={cfg.data.test_size}: must be >= 0 (held-out sequences; 0: "
                     "data.test_fraction of them)")
        if not 0 < cfg.data.test_fraction < 1:
            p.append(f"data.test_fraction={cfg.data.test_fraction}: must be in (0, 1) (the share of sequences "
                     "held out when data.test_size is 0)")
        if cfg.lm.eval_batch_size <= 0:
            p.append(f"lm.eval_batch_size={cfg.lm.eval_batch_size}: must be > 0")
        for v in cfg.lm.variants:
            name, _, k = v.partition(":")
            if name not in ("labels", *LM_DISTANCES) or (k and (not k.isdigit() or DISTANCES[name].reads != "topk")):
                forms = [f"{n}[:<K>]" if DISTANCES[n].reads == "topk" else n for n in LM_DISTANCES]
                p.append(f"lm.variants: {v!r} is not one of labels, {', '.join(forms)}")
            elif k and not 0 < int(k) <= cfg.cache.k:
                p.append(f"lm.variants: {v!r} asks for more than the cache's K={cfg.cache.k}")

    # -- data, teacher, cache -----------------------------------------------------------------
    def load_data(self) -> TokenData:
        """The token data, with the teacher's tokenizer (the model itself is not loaded)."""
        return load_tokens(self.cfg.data, self.root, self.tokenizer)

    @functools.cached_property
    def tokenizer(self):
        """The teacher's tokenizer, loaded once (the model is not)."""
        return load_tokenizer(self.cfg.teacher, self.cfg.paths.conversions)

    def cache_key(self, data: TokenData) -> str:
        t = dataclasses.asdict(self.cfg.teacher)
        ident = {"teacher": {k: t[k] for k in ("name", "path", "gguf_file", "precision")},
                 "data": data.content_hash(), "capture": self.capture_settings(t["precision"].value),
                 "layout": layout_settings(self.cfg.cache)}
        return cache_key(self.cfg.data.name, self.cfg.teacher.name, ident)

    def expected_fields(self, data: TokenData) -> dict:
        """From the tokenizer and the weight files' hash: the model is never loaded."""
        precision = self.teacher_precision(data)
        return fingerprint_fields(dataset=data.content_hash(),
                                  teacher=teacher_identity(self.cfg.teacher, self.tokenizer, precision),
                                  capture=self.capture_settings(precision))

    def matmul_shapes(self, data: TokenData) -> list[tuple[int, int]]:
        return teacher_shapes(teacher_config(self.cfg.teacher, self.cfg.paths.conversions))

    def open_cache(self, data: TokenData, num_classes: int | None = None) -> CacheReader:
        return self.checked_reader(super().open_cache(data), data)

    def checked_reader(self, reader: CacheReader, data: TokenData) -> CacheReader:
        """``reader`` once its sequence index and tokenizer are the token data's."""
        index = data.index
        if not np.array_equal(reader.offsets, index.offsets) or (reader.positions is None) != (
                index.positions is None) or (index.positions is not None and not np.array_equal(
                    reader.positions, index.positions)):
            raise CacheError(f"cache {reader.path!r}: its sequence index (offsets, positions) differs from the "
                             "token data's; re-run stage 1")
        if reader.manifest.tokenizer_sha256 not in ("", data.tokenizer_hash):
            raise CacheError(f"cache {reader.path!r} was captured with another tokenizer than the teacher's "
                             f"(tokenizer.json sha256 {reader.manifest.tokenizer_sha256[:12]}, the teacher's "
                             f"{data.tokenizer_hash[:12]}): re-run stage 1 with this teacher")
        return reader

    def index(self, data: TokenData):
        """The cache's sequence index: where the rows are, and the teacher's tokenizer (each
        token's bytes: what aligns a student with another tokenizer). A tokenizer without a
        ``tokenizers`` backend (a slow one) is not recorded."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str().encode() if backend is not None else None
        return dataclasses.replace(data.index, tokenizer=text)

    def load_teacher(self, data: TokenData) -> LMTeacher:
        return load_teacher(self.cfg.teacher, self.cfg.paths.conversions, self.teacher_precision(data))

    def plan(self, teacher: LMTeacher, data: TokenData):
        width = teacher.model.get_output_embeddings().weight.shape[0]
        fields = fingerprint_fields(dataset=data.content_hash(), teacher=teacher.identity,
                                    capture=self.capture_settings(teacher.identity["precision"]))
        index = self.index(data)
        m = plan_manifest(self.cfg.cache, rows=int(index.offsets[-1]), num_classes=width,
                          splits={name: data.rows(name) for name in data.sequences},
                          fingerprint=make_fingerprint(fields), index=index,
                          task={"vocab": {"logit_width": width, "tokenizer_size": len(teacher.tokenizer)}})
        log.info("capture plan: %d token rows (of %d tokens) in %d sequences, logit width %d", m.rows,
                 len(data.tokens), m.sequences, width)
        return m, index

    def rows(self, teacher: LMTeacher, data: TokenData, device) -> TokenRows:
        return TokenRows(teacher.model.to(device), data, self.cfg.teacher.batch_size, teacher.pad_id, device)

    @torch.inference_mode()
    def after_capture(self, teacher: LMTeacher, data: TokenData, cache_url: str) -> None:
        """The teacher's held-out perplexity, stored beside the cache (``teacher_eval.json``)
        so stage 3 compares students with it without loading the teacher. Computed once, by rank 0."""
        storage = Storage(cache_url, self.cfg.cache.storage_options)
        if self.processes.rank != 0 or read_teacher_eval(storage):
            return
        device = choose_device(self.cfg.teacher.device)
        ev = teacher_heldout_nll(teacher.model.to(device), data, self.cfg.teacher.batch_size, device, teacher.pad_id)
        ev["heldout_bytes"] = heldout_bytes(data, teacher.tokenizer)
        storage.write_atomic(json.dumps(ev, indent=2).encode(), TEACHER_EVAL)
        log.info("teacher held-out perplexity %.2f over %d tokens", ev["heldout_perplexity"], ev["heldout_tokens"])

    def row_labels(self, data: TokenData, reader: CacheReader) -> np.ndarray:
        """A token row's label is the next token of its sequence (none after the last)."""
        index = data.index
        seq = np.repeat(np.arange(len(index.offsets) - 1), np.diff(index.offsets))
        pos = np.arange(len(seq)) - index.offsets[seq] if index.positions is None else index.positions
        at = data.offsets[seq] + pos + 1  # the next token's index in data.tokens
        has_next = at < data.offsets[seq + 1]
        return np.where(has_next, data.tokens[np.minimum(at, len(data.tokens) - 1)], -1).astype(np.int64)

    # -- students -------------------------------------------------------------------------------
    def variants(self) -> list[Variant]:
        if self.cfg.lm.variants:
            return [Variant.parse(v) for v in self.cfg.lm.variants]
        return [Variant("labels"), Variant(self.cfg.loss.distance.value, self.cfg.loss.k)]

    def student_runs(self, data: TokenData, reader: CacheReader, device) -> Iterator[StudentRun]:
        """Each student once per variant, from the same initialisation on the same sequences."""
        for name, spec in self.cfg.student.items():
            for v in self.variants():
                yield self.student_run(name, spec, v, data, reader, device)

    def student_run(self, name: str, spec, v: Variant, data: TokenData, reader: CacheReader,
                    device: torch.device) -> StudentRun:
        cfg = self.cfg
        loss = v.loss(cfg.loss)
        cross = self.student_tokens(spec, reader, data)
        seq_len = cfg.data.seq_len if cross is None else max(cfg.data.seq_len, int(np.diff(cross.tokens.offsets).max()))
        width = len(cross.tokenizer) if cross is not None else reader.manifest.num_classes
        student = build_student(spec, int(spec.kwargs.get("vocab_size", width)), seq_len, cfg.train.seed,
                                cfg.teacher, cfg.paths.conversions).to(device)
        vocab = student.get_output_embeddings().weight.shape[0]
        if cross is None:
            adapter = eval_adapter = vocab_map(spec, reader, vocab)
        else:
            if vocab < width:
                raise ConfigError(f"student {name}: its vocabulary has {vocab} ids, its tokenizer "
                                 f"{spec.tokenizer!r} {width}: drop kwargs.vocab_size or make it >= {width}")
            proj = projection(cross.teacher, cross.student, spec.projection.value)
            projects = DISTANCES[loss.distance].by_class
            adapter = CrossTokenizer(cross.tokens, pad_id(cross.tokenizer), proj if projects else None,
                                     loss.temperature)
            eval_adapter = adapter.projecting(proj, 1.0)
        arrays, lse_column = teacher_arrays(reader.manifest, loss)
        rank, world = joined_group()
        # the fused head (no (B, L, V) logits): one process (DistributedDataParallel averages
        # gradients through the model's own forward), a distance it has a fused form of
        fused = cfg.lm.fused_head and world == 1 and (loss.lam <= 0 or loss.distance.value in FUSED_DISTANCES)
        if cfg.lm.fused_head and not fused:
            log.info("%s %s: the unfused head (%s)", name, v.label,
                     "several processes" if world > 1 else f"{loss.distance.value} has no fused form")
        stream = SequenceStream(reader, data.tokens, split="train", batch_size=cfg.train.batch_size,
                                seed=cfg.train.seed, arrays=arrays, rank=rank, world_size=world,
                                token_offsets=data.offsets)
        row = {"variant": v.label, "bytes_per_token": bytes_per_token(v, reader)}
        if cross is not None:
            row |= {"tokenizer": spec.tokenizer, "vocabulary": width, "projection": spec.projection.value,
                    "aligned_fraction": cross.tokens.aligned_fraction(*data.sequences["train"])}

        def evaluate(models: dict) -> dict:
            ev = evaluate_student(models[v.label], self.eval_reader(data) or reader, data, cfg.lm.eval_batch_size,
                                  eval_adapter, device)
            n_bytes = self.heldout_bytes(data) if cross is None else cross.tokens.predicted_bytes(
                *data.sequences["heldout"])
            ev["heldout_bits_per_byte"] = bits_per_byte(ev["heldout_nll"], ev["heldout_tokens"], n_bytes)
            log.info("%s %s: held-out perplexity %.2f, %.4f bits/byte, KL %.4f", name, v.label,
                     ev["heldout_perplexity"], ev["heldout_bits_per_byte"], ev["heldout_kl_topk"] or float("nan"))
            return ev

        def save(model, folder: str) -> None:  # a standard HF folder (config.json + model.safetensors)
            model.save_pretrained(folder)
            if cross is not None:
                cross.tokenizer.save_pretrained(folder)  # the student reads its own tokens

        return StudentRun(
            name=name, label=v.label,
            identity=student_identity(spec, loss, cfg.train) | {"weights": student_weights(spec, cfg.teacher)},
            fits=[Fit(v.label, student, stream, lambda model, batch: sequence_loss(
                model, batch, loss, lse_column, adapter, device, fused, cfg.lm.fused_head_rows))],
            evaluate=evaluate, save=save, row=row,
            throughput=("tokens_per_s", cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len))

    def eval_reader(self, data: TokenData) -> CacheReader | None:
        """``lm.eval_cache`` opened and checked against the run's data and teacher as the
        training cache is (any representation: it is a yardstick; None: not set)."""
        if not self.cfg.lm.eval_cache:
            return None
        if getattr(self, "_eval_reader", None) is None:
            expected = {k: v for k, v in self.expected_fields(data).items() if k != "capture"}
            self._eval_reader = self.checked_reader(
                open_cache_at(self.cfg.lm.eval_cache, expected=expected,
                           storage_options=self.cfg.cache.storage_options), data)
        return self._eval_reader

    def student_tokens(self, spec, reader: CacheReader, data: TokenData) -> CrossData | None:
        """None when the student reads the teacher's tokens (no ``student.tokenizer``, or one
        identical to the teacher's); else its tokenizer and the corpus re-tokenized and
        aligned by byte spans (computed once per tokenizer)."""
        if not spec.tokenizer:
            return None
        if spec.vocab_map:
            raise ConfigError(f"student.tokenizer={spec.tokenizer!r} and student.vocab_map={spec.vocab_map!r}: set "
                             "one (a tokenizer is aligned by byte spans; a vocab_map renames the teacher's ids)")
        done = self.__dict__.setdefault("_student_tokens", {})
        if spec.tokenizer not in done:
            text = reader.tokenizer_json
            if text is None:
                raise ConfigError(f"cache {reader.path!r} records no teacher tokenizer, so its tokens' byte spans are "
                                 f"unknown and student.tokenizer={spec.tokenizer!r} cannot be aligned with them: "
                                 "capture it again with stage 1 of this version and a fast (tokenizer.json) "
                                 "teacher tokenizer, which every token cache then records")
            tok = student_tokenizer(spec.tokenizer, data, text, self.root)
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is None:
                raise ConfigError(f"student.tokenizer={spec.tokenizer!r} is a slow tokenizer; byte alignment reads a "
                                 "fast one's tokenizer.json")
            if tokenizer_hash(tok) == reader.manifest.tokenizer_sha256:  # before reading either one's bytes
                log.info("student.tokenizer=%s is the teacher's: no alignment needed", spec.tokenizer)
                done[spec.tokenizer] = None
            else:
                teacher = TokenBytes(text, "teacher's tokenizer")
                student = TokenBytes(backend.to_str(), f"student.tokenizer={spec.tokenizer}")
                tokens = retokenize(data, teacher, tok, student)
                cross = CrossData(tok, tokens, teacher, student)
                log.info("student.tokenizer=%s: %d ids; the corpus is %d of its tokens (%d of the teacher's); "
                         "%.1f%% of its training positions are aligned with a teacher row", spec.tokenizer, len(tok),
                         len(tokens.tokens), len(data.tokens), 100 * tokens.aligned_fraction(*data.sequences["train"]))
                done[spec.tokenizer] = cross
        return done[spec.tokenizer]

    def heldout_bytes(self, data: TokenData) -> int:
        if getattr(self, "_heldout_bytes", None) is None:
            self._heldout_bytes = heldout_bytes(data, self.tokenizer)
        return self._heldout_bytes

    def results(self, rows: list[dict], reader: CacheReader) -> tuple[dict, str]:
        teacher = read_teacher_eval(reader.storage)
        if teacher and "heldout_bytes" in teacher:
            teacher["heldout_bits_per_byte"] = bits_per_byte(teacher["heldout_nll"], teacher["heldout_tokens"],
                                                             teacher["heldout_bytes"])
        full = reader.manifest.num_classes * 2
        return ({"teacher": teacher, "full_fp16_bytes_per_token": full},
                format_lm_results(rows, teacher, full))



@dataclass
class CrossData:
    """A student tokenizer other than the teacher's, and the corpus in its tokens."""

    tokenizer: object
    tokens: StudentTokens
    teacher: TokenBytes
    student: TokenBytes


