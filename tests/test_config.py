import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from pipeline.config import StudentArch
from pipeline.tasks import validate
from tests.support import compose_config


def test_default_config_composes_and_validates():
    cfg = validate(compose_config())
    assert cfg.stage == "all"
    assert set(cfg.student) == {"linear", "mlp"}
    assert cfg.student["mlp"].arch is StudentArch.mlp
    assert cfg.data.transfer_size == 100_000 and cfg.data.train_size == 4000 and cfg.data.test_size == 1000


def test_student_group_selects_one_or_many():
    assert set(compose_config("student=cnn").student) == {"cnn"}
    cfg = compose_config("student=[linear,cnn]", "student.cnn.channels=8")
    assert set(cfg.student) == {"linear", "cnn"} and cfg.student["cnn"].channels == 8


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
    cfg = compose_config("loss.temperature=-1", "train.epochs=0", "stage=4", "data.train_size=0")
    with pytest.raises(ValueError) as e:
        validate(cfg)
    msg = str(e.value)
    for needle in ("loss.temperature", "train.epochs", "stage='4'", "data.train_size", "4 problem"):
        assert needle in msg


def test_cli_rejects_bad_values_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", f"paths.root={tmp_path}", "loss.temperature=0",
                           "teacher.device=cuda:7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loss.temperature=0.0: must be > 0" in proc.stderr + proc.stdout
    assert not (tmp_path / "datasets").exists()  # nothing was generated


def test_cli_unknown_group_option_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", f"paths.root={tmp_path}", "loss=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'loss/nope'" in proc.stderr and "kl" in proc.stderr


def test_each_task_validates_its_own_settings():
    """task=lm accepts what its data config documents (train_size 0: every sequence not held
    out) and never reads the classifier's num_classes; each task refuses the other's parts."""
    from pipeline.tasks import validate
    from tests.support import compose_config

    validate(compose_config("task=lm", "data.train_size=0", "data.num_classes=-1"))
    with pytest.raises(ValueError, match="data.train_size=0: must be > 0"):
        validate(compose_config("data.train_size=0"))
    with pytest.raises(ValueError, match=r"students \['causal_lm'\] are causal LMs"):
        validate(compose_config("student=causal_lm"))
    with pytest.raises(ValueError, match="task=lm trains with topk_kl, sampled_kl, uld_topk, uld_sampled"):
        validate(compose_config("task=lm", "loss=kl"))
