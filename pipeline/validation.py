"""The config's checks, made before any stage starts: keys that were renamed (refused
before composition, naming the new key), options of the other task's sections, and the
ranges and cross-field rules of the settings every task shares (each task checks its own:
:func:`pipeline.tasks.validate` reports all of them at once)."""

from __future__ import annotations

from pipeline.config import SECTIONS, Config, DataSource, DeriveMode, Stage
from pipeline.errors import ConfigError

# Keys that moved: an override of the old name fails before composition, naming the new one.
RENAMED = {"train.fused_head": "lm.fused_head", "train.fused_head_rows": "lm.fused_head_rows"}


def check_overrides(overrides: list[str]) -> None:
    """Refuse, before Hydra composes them, command-line overrides of renamed keys (naming
    the key that replaced each) and a ``stage`` that is none (Hydra would list the enum's
    names only, not the numbers users write)."""
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in RENAMED:
            raise ConfigError(f"{key} is now {RENAMED[key]}: write {RENAMED[key]}={value}")
        names = {s.name for s in Stage} | {str(s.value) for s in Stage if s is not Stage.all}
        if key == "stage" and "," not in value and value not in names:
            raise ConfigError(f"stage={value}: expected 1 (capture), 2 (audit), 3 (distill) or all (the three "
                              "in turn)")


def _positive(problems: list[str], where: str, value: float) -> None:
    if value <= 0:
        problems.append(f"{where}={value}: must be > 0")


def section_problems(cfg: Config) -> list[str]:
    """Group options of another task (``data=shakespeare`` with task=classify): each is an
    option whose fields that task does not read."""
    task = cfg.task.value
    p = []
    for section, schema in SECTIONS[task].items():
        values = cfg.student.items() if section == "student" else [("", getattr(cfg, section))]
        for key, value in values:
            if not isinstance(value, schema):
                other = next(t for t, s in SECTIONS.items() if isinstance(value, s[section]))
                where = f"student.{key}" if key else section
                p.append(f"{where} is a task={other} option ({type(value).__name__}); task={task} reads "
                         f"{schema.__name__}: pick one of its {section} options (conf/{section}/*.yaml), or "
                         f"task={other}")
    return p


def shared_problems(cfg: Config) -> list[str]:
    """Range and cross-field problems of the settings every task shares (each task checks
    its own: :func:`pipeline.tasks.validate` reports both at once)."""
    p: list[str] = []
    if "://" in cfg.paths.root:
        p.append(f"paths.root={cfg.paths.root!r}: must be a local folder (run folders, datasets and checkpoints "
                 "live there); put the cache on object storage with cache.path=s3://bucket/prefix")
    if cfg.data.source is DataSource.disk and not cfg.data.path:
        p.append("data.path is required with data.source=disk (a save_to_disk folder or parquet/arrow files)")
    if cfg.data.source is DataSource.corpus and not cfg.data.path:
        p.append("data.path is required with data.source=corpus (a save_to_disk folder, or .jsonl / .parquet / "
                 ".arrow files or a folder of them)")
    if not cfg.student:
        p.append("no student selected: pick one or more, e.g. student=mlp or student=[linear,mlp]")
    _positive(p, "loss.temperature", cfg.loss.temperature)
    for name in ("alpha", "lam", "k"):
        if getattr(cfg.loss, name) < 0:
            p.append(f"loss.{name}={getattr(cfg.loss, name)}: must be >= 0")
    if cfg.loss.beta is not None and not 0 <= cfg.loss.beta <= 1:
        p.append(f"loss.beta={cfg.loss.beta}: must be in [0, 1] (js: 0 = forward KL, 1 = reverse KL; "
                 "the skewed KLs: the share of the distribution itself in the mixture; TAID: the teacher's "
                 "weight at the first step)")
    if cfg.loss.alpha == 0 and cfg.loss.lam == 0:
        p.append("loss.alpha and loss.lam are both 0: nothing to train on")
    for name in ("chunk_rows", "shard_chunks", "k", "samples", "sample_temperature", "max_full_gb"):
        _positive(p, f"cache.{name}", getattr(cfg.cache, name))
    if not cfg.cache.modes or len(set(cfg.cache.modes)) != len(cfg.cache.modes):
        p.append(f"cache.modes={[m.value for m in cfg.cache.modes]}: list each of full, topk, sampled at most once")
    if any(t <= 0 for t in cfg.cache.temperatures) or not cfg.cache.temperatures:
        p.append(f"cache.temperatures={cfg.cache.temperatures}: need at least one, all > 0")
    if cfg.cache.samples > 65535:
        p.append(f"cache.samples={cfg.cache.samples}: at most 65535 (counts are stored as uint16)")
    if not 1 <= cfg.cache.zstd_level <= 22:
        p.append(f"cache.zstd_level={cfg.cache.zstd_level}: must be in 1..22")
    if cfg.derive.mode is DeriveMode.auto and cfg.cache.budget_bytes_per_token <= 0:
        p.append("derive.mode=auto derives what the planner picks for a budget: set cache.budget_bytes_per_token")
    if cfg.cache.budget_bytes_per_token < 0:
        p.append(f"cache.budget_bytes_per_token={cfg.cache.budget_bytes_per_token}: bytes per token, > 0 (0: no plan)")
    _positive(p, "derive.k", cfg.derive.k)
    _positive(p, "derive.samples", cfg.derive.samples)
    from pipeline.cache.format import (  # (the checks the capture and derive make)
        check_top_p,
        check_value_bits,
    )

    for section in ("cache", "derive"):
        for check, value in ((check_value_bits, getattr(cfg, section).value_bits),
                             (check_top_p, getattr(cfg, section).top_p)):
            try:
                check(value, None, section)
            except ConfigError as e:
                p.append(str(e))
    if not 0 <= cfg.loss.k <= cfg.cache.k:
        p.append(f"loss.k={cfg.loss.k}: must be in 0..cache.k={cfg.cache.k} (0 uses all cached logits)")
    for name in ("batch_size", "lr", "shuffle_window", "grad_accum"):
        _positive(p, f"train.{name}", getattr(cfg.train, name))
    for name in ("steps", "checkpoint_every", "clip_norm", "warmup_steps"):
        if getattr(cfg.train, name) < 0:
            p.append(f"train.{name}={getattr(cfg.train, name)}: must be >= 0")
    if cfg.train.steps == 0 and cfg.train.epochs <= 0:
        p.append(f"train.epochs={cfg.train.epochs} with train.steps=0: set one of them > 0")
    return p
