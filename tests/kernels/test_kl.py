"""The Numba KL kernel against a plain torch reference written here: values and
gradients, on seeded inputs including the edge cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import kernels
from pipeline.losses import distance_loss


def kl_forward(student: np.ndarray, teacher: np.ndarray, T: float):
    """The kernel as training calls it, per row: (T^2 KL, its gradient)."""
    return kernels.distance("kl", student, teacher, temperature=T, reduction="none")


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """The autograd bridge training uses, per row."""
    return distance_loss("kl", student, teacher, temperature=T, reduction="none")


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row, the textbook way."""
    log_p = F.log_softmax(teacher.double() / T, dim=-1)
    log_q = F.log_softmax(student.double() / T, dim=-1)
    return T * T * F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def _check(s: np.ndarray, t: np.ndarray, T: float, rtol: float, atol: float):
    loss, grad = kl_forward(s, t, T)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ref = reference_kl(st, torch.from_numpy(t.astype(np.float64)), T)
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad, st.grad.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("C", [2, 10, 1000])
def test_values_and_gradients_match_torch(T, C):
    rng = np.random.default_rng(C)
    s = rng.standard_normal((33, C)).astype(np.float32) * 3
    t = rng.standard_normal((33, C)).astype(np.float32) * 3
    _check(s, t, T, rtol=1e-4, atol=1e-5)


def test_large_vocabulary():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((3, 128_000)).astype(np.float32)
    t = rng.standard_normal((3, 128_000)).astype(np.float32) * 2
    _check(s, t, 1.0, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 8.0])
def test_huge_logits_stay_finite(T):
    rng = np.random.default_rng(2)
    s = (rng.standard_normal((8, 50)) * 1e4).astype(np.float32)
    t = (rng.standard_normal((8, 50)) * 1e4).astype(np.float32)
    loss, grad = kl_forward(s, t, T)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    _check(s.astype(np.float64), t.astype(np.float64), T, rtol=1e-6, atol=1e-6)


def test_one_hot_teacher_and_identical_rows():
    s = np.zeros((2, 5), np.float64)
    t = np.array([[1e4, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float64)
    loss, grad = kl_forward(s, t, 1.0)
    np.testing.assert_allclose(loss, [np.log(5), 0.0], atol=1e-12)  # KL(one-hot || uniform) = log C
    np.testing.assert_allclose(grad[1], 0.0, atol=1e-15)


def test_float16_teacher_matches_float32_teacher():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((16, 20)).astype(np.float32)
    t16 = (rng.standard_normal((16, 20)) * 4).astype(np.float16)
    a = kl_forward(s, t16, 2.0)
    b = kl_forward(s, t16.astype(np.float32), 2.0)
    # same values read; only the summation order may differ (vectorised gathers): float32 rounding
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


def test_autograd_bridge_passes_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64) * 2
    assert torch.autograd.gradcheck(lambda x: kl_divergence(x, t, 2.0), (s,))
    torch.testing.assert_close(kl_divergence(s, t, 2.0), reference_kl(s, t, 2.0))


@pytest.mark.parametrize("bad", ["shape", "temperature", "dtype"])
def test_invalid_inputs_name_the_argument(bad):
    s, t, T = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), 1.0
    if bad == "shape":
        t, match = np.zeros((2, 4), np.float32), "teacher"
    elif bad == "temperature":
        T, match = 0.0, "temperature"
    else:
        s, match = np.zeros((2, 3), np.int32), "student dtype"
    with pytest.raises(ValueError, match=match):
        kl_forward(s, t, T)
