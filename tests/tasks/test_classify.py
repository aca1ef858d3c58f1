import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.device import autocast, choose_device
from pipeline.tasks import validate
from pipeline.tasks.classify import obtain_teacher
from pipeline.tasks.classify.data import Split, Splits
from tests.support import compose_config


def _splits(n=20, width=40, classes=10):
    rng = np.random.default_rng(0)
    mk = lambda name, k, y: Split(name, rng.standard_normal((k, width)).astype(np.float32), y)  # noqa: E731
    return Splits({"transfer": mk("transfer", n, np.full(n, -1)),
                   "train": mk("train", n, rng.integers(0, classes, n)),
                   "test": mk("test", n, rng.integers(0, classes, n))}, classes)


def test_user_teacher_by_target_and_checkpoint(tmp_path):
    lin = torch.nn.Linear(40, 10)
    save_file(dict(lin.state_dict()), str(tmp_path / "w.safetensors"))
    cfg = validate(compose_config("+teacher.kwargs.in_features=40", "+teacher.kwargs.out_features=10",
                                  "teacher._target_=torch.nn.Linear", f"teacher.checkpoint={tmp_path}/w.safetensors"))
    model, ckpt = obtain_teacher(cfg, _splits(), str(tmp_path))
    assert isinstance(model, torch.nn.Linear) and ckpt.endswith("w.safetensors")
    torch.testing.assert_close(model.weight, lin.weight)


def test_user_teacher_with_wrong_checkpoint_is_refused(tmp_path):
    save_file({"weight": torch.zeros(3, 40)}, str(tmp_path / "w.safetensors"))
    cfg = compose_config("+teacher.kwargs.in_features=40", "+teacher.kwargs.out_features=10",
                         "teacher._target_=torch.nn.Linear", f"teacher.checkpoint={tmp_path}/w.safetensors")
    with pytest.raises(ValueError, match="does not match the configured model"):
        obtain_teacher(cfg, _splits(), str(tmp_path))


def test_user_teacher_needs_a_checkpoint():
    with pytest.raises(ValueError, match="needs its weights"):
        validate(compose_config("teacher._target_=torch.nn.Linear"))


def test_explicit_missing_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        choose_device("cuda")
    with pytest.raises(ValueError, match="not supported"):
        choose_device("mps")
    assert choose_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        autocast(torch.device("cpu"), "fp16")


def test_any_torch_module_as_a_student():
    from pipeline.tasks.classify.models import build_student

    cfg = validate(compose_config("student=mlp", "student.mlp._target_=torch.nn.Linear",
                                  "+student.mlp.kwargs.in_features=40", "+student.mlp.kwargs.out_features=10"))
    model = build_student(cfg.student["mlp"], 40, 10)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 10
    cfg.student["mlp"].kwargs["out_features"] = 7
    with pytest.raises(ValueError, match="make its output width 10"):
        build_student(cfg.student["mlp"], 40, 10)
