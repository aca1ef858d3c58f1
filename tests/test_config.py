import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from pipeline.config import Stage, StudentArch
from pipeline.errors import ConfigError
from pipeline.processes import Processes, resolve_processes
from pipeline.tasks import validate
from tests.support import compose_config


def test_default_config_composes_and_validates():
    cfg = validate(compose_config())
    assert cfg.stage is Stage.all and cfg.derive.mode is None
    assert set(cfg.student) == {"linear", "mlp"}
    assert cfg.student["mlp"].arch is StudentArch.mlp
    assert cfg.data.transfer_size == 100_000 and cfg.data.train_size == 4000 and cfg.data.test_size == 1000


def test_student_group_selects_one_or_many():
    assert set(compose_config("student=cnn").student) == {"cnn"}
    cfg = compose_config("student=[linear,cnn]", "student.cnn.channels=8")
    assert set(cfg.student) == {"linear", "cnn"} and cfg.student["cnn"].channels == 8


def test_processes_come_from_the_config_else_torchruns_environment():
    cfg = compose_config()
    assert resolve_processes(cfg) == Processes(0, 1, torchrun=False)  # no environment given: one process
    assert resolve_processes(cfg, {"RANK": "1", "WORLD_SIZE": "2"}) == Processes(1, 2, torchrun=True)
    workers = compose_config("rank=2", "world_size=4")  # plain processes, stage 1 workers
    assert resolve_processes(workers, {}) == Processes(2, 4, torchrun=False)
    with pytest.raises(ConfigError, match="expected integers"):
        resolve_processes(cfg, {"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        resolve_processes(compose_config("rank=3", "world_size=2"))


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="foo"):
        compose_config("cache.foo=1")


def test_unknown_group_option_names_the_choices():
    with pytest.raises(MissingConfigException) as e:
        compose_config("student=resnet")
    assert "linear" in str(e.value.options) and "mlp" in str(e.value.options)


def test_invalid_enum_value_names_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config("cache.dtype=int8")
    assert "float16" in str(e.value.__cause__) and "bfloat16" in str(e.value.__cause__)


def test_validate_reports_every_problem_at_once():
    cfg = compose_config("loss.temperature=-1", "train.epochs=0", "cache.zstd_level=30", "data.train_size=0")
    with pytest.raises(ValueError) as e:
        validate(cfg)
    msg = str(e.value)
    for needle in ("loss.temperature", "train.epochs", "cache.zstd_level=30", "data.train_size", "4 problem"):
        assert needle in msg


def test_cli_rejects_bad_values_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", f"paths.root={tmp_path}", "loss.temperature=0",
                           "teacher.device=cuda:7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loss.temperature=0.0: must be > 0" in proc.stderr + proc.stdout
    assert not (tmp_path / "datasets").exists()  # nothing was generated


def test_representation_settings_are_checked_by_the_checks_stage_1_and_stage_2_make():
    """cache.* / derive.* value_bits and top_p: before any work, by the same functions the
    capture and the derive call (pipeline/cache/format.py), with the same messages."""
    from pipeline.tasks import validate

    with pytest.raises(ConfigError) as e:
        validate(compose_config("cache.value_bits=5", "derive.top_p=1.5", "loss.k=65"))
    msg = str(e.value)
    assert "3 problem(s)" in msg and "cache.value_bits=5: 16 (values in cache.dtype), 8 or 4" in msg
    assert "derive.top_p=1.5: the probability mass each adaptive top-k row keeps" in msg
    assert "loss.k=65: must be in 0..cache.k=64" in msg


def test_a_renamed_key_fails_naming_its_new_name(tmp_path):
    from tests.support import run_cli

    proc = run_cli(tmp_path, "task=lm", "train.fused_head=false", code=2)
    assert "ConfigError: train.fused_head is now lm.fused_head: write lm.fused_head=false" in proc.stderr
    assert compose_config("task=lm", "lm.fused_head=false").lm.fused_head is False


def test_stages_and_derive_modes_are_closed_sets(tmp_path):
    """``stage`` and ``derive.mode`` are enums: a stage by number or name, anything else
    refused in one line listing the numbers; an unknown derive mode fails at composition."""
    from pipeline.config import DeriveMode, Stage
    from pipeline.validation import check_overrides
    from tests.support import run_cli

    assert compose_config("stage=2").stage is compose_config("stage=audit").stage is Stage.audit
    assert compose_config().stage is Stage.all
    assert compose_config("derive.mode=topk").derive.mode is DeriveMode.topk
    with pytest.raises(Exception, match="derive.mode"):
        compose_config("derive.mode=top")
    check_overrides(["stage=3", "stage=all", "stage=distill", "stage=1,2"])
    proc = run_cli(tmp_path, "stage=4", code=2)
    assert "ConfigError: stage=4: expected 1 (capture), 2 (audit), 3 (distill) or all" in proc.stderr


def test_cli_unknown_group_option_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", f"paths.root={tmp_path}", "loss=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'loss/nope'" in proc.stderr and "kl" in proc.stderr


def test_each_task_validates_its_own_settings():
    """task=lm accepts what its data config documents (train_size 0: every sequence not held
    out); each task's sections hold only its own fields, and it refuses the other's options."""
    from pipeline.tasks import validate
    from tests.support import compose_config

    validate(compose_config("task=lm", "data.train_size=0"))
    for key in ("data.num_classes=3", "data.transfer_size=5", "teacher.checkpoint=x", "student.causal_lm.hidden=[8]"):
        with pytest.raises(ConfigCompositionException, match=key.split("=")[0].rsplit(".", 1)[1]):
            compose_config("task=lm", key)  # a classifier's field
    for key in ("data.seq_len=8", "teacher.gguf_file=x", "student.mlp.tokenizer=bpe:8"):
        with pytest.raises(ConfigCompositionException, match=key.split("=")[0].rsplit(".", 1)[1]):
            compose_config(key)  # a language model's field
    with pytest.raises(ValueError, match="data.train_size=0: must be > 0"):
        validate(compose_config("data.train_size=0"))
    with pytest.raises(ConfigError, match="student.causal_lm is a task=lm option .* task=classify reads "
                                          "ClassifyStudentConfig"):
        validate(compose_config("student=causal_lm"))
    with pytest.raises(ConfigError, match="teacher is a task=lm option"):
        validate(compose_config("teacher=smollm2"))
    with pytest.raises(ConfigError, match="data is a task=classify option .* or task=classify"):
        validate(compose_config("task=lm", "data=mnist1d"))
    from pipeline.tasks.lm import LM_DISTANCES

    with pytest.raises(ValueError, match=f"task=lm trains with {', '.join(LM_DISTANCES)}$"):  # every sparse one
        validate(compose_config("task=lm", "loss=kl"))
