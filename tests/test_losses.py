import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.losses import distill_loss, torch_distance


def test_unlabeled_rows_only_contribute_the_distillation_term():
    torch.manual_seed(0)
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([2, -1, 0, -1, -1, 3])
    cfg = LossConfig(alpha=0.7, lam=1.3, temperature=2.0)
    got = distill_loss(s, y, t, cfg)
    want = 0.7 * F.cross_entropy(s[y >= 0], y[y >= 0]) + 1.3 * torch_distance("kl", s, t, 2.0).mean()
    torch.testing.assert_close(got, want)
    got.backward()
    g1 = s.grad.clone()
    s.grad = None
    want.backward()
    torch.testing.assert_close(g1, s.grad)


def test_all_unlabeled_batch_and_label_only():
    s = torch.randn(3, 4)
    t = torch.randn(3, 4)
    y = torch.full((3,), -1)
    torch.testing.assert_close(distill_loss(s, y, t, LossConfig(alpha=1, lam=1, temperature=1.0)),
                               torch_distance("kl", s, t, 1.0).mean())
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(distill_loss(s, y, None, LossConfig()), F.cross_entropy(s, y))


def test_coef_scales_loss_and_gradient_like_a_multiplier():
    from pipeline.losses import distance_loss

    torch.manual_seed(3)
    t = torch.randn(8, 5, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1])
    a = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    la = distance_loss("js", a, t, temperature=2.0, mask=mask, coef=0.3)
    lb = 0.3 * distance_loss("js", b, t, temperature=2.0, mask=mask)
    torch.testing.assert_close(la, lb)
    (la + a.sum()).backward()
    (lb + b.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def _skew_reference(a: list[float], b: list[float], beta: float, temperature: float) -> float:
    """T^2 KL(A || beta A + (1 - beta) B) for softmaxes A, B of logit rows a, b at T, in
    float64 NumPy, written from the definition."""
    import numpy as np

    def softmax(x):
        z = np.asarray(x, np.float64) / temperature
        e = np.exp(z - z.max())
        return e / e.sum()

    pa, pb = softmax(a), softmax(b)
    m = beta * pa + (1 - beta) * pb
    return float(temperature**2 * (pa * np.log(pa / m)).sum())


def test_the_skewed_kls_equal_their_definition_and_meet_kl_at_the_ends():
    """skew_kl = KL(p || b p + (1-b) q) and skew_reverse_kl = KL(q || b q + (1-b) p) on
    hand-made rows (a sharp one, a flat one, equal rows); b=0 is forward or reverse KL
    exactly, b=1 gives 0; the gradient is checked against finite differences."""
    import pytest

    t = torch.tensor([[4.0, 0.0, -2.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, -1.0, 3.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 2.0, -1.0, 1.0], [3.0, -3.0, 0.0, 0.0], [1.0, -1.0, 3.0, 0.0]], dtype=torch.float64)
    for beta in (0.1, 0.5, 0.9):
        for temperature in (1.0, 2.0):
            got_f = torch_distance("skew_kl", s, t, temperature, beta)
            got_r = torch_distance("skew_reverse_kl", s, t, temperature, beta)
            for i in range(3):
                assert got_f[i].item() == pytest.approx(_skew_reference(t[i], s[i], beta, temperature), rel=1e-12)
                assert got_r[i].item() == pytest.approx(_skew_reference(s[i], t[i], beta, temperature), rel=1e-12)
            assert abs(got_f[2].item()) < 1e-15 and abs(got_r[2].item()) < 1e-15  # equal rows: 0 (to rounding)
    torch.testing.assert_close(torch_distance("skew_kl", s, t, 2.0, 0.0), torch_distance("kl", s, t, 2.0))
    torch.testing.assert_close(torch_distance("skew_reverse_kl", s, t, 2.0, 0.0),
                               torch_distance("reverse_kl", s, t, 2.0))
    assert torch.equal(torch_distance("skew_kl", s, t, 2.0, 1.0), torch.zeros(3, dtype=torch.float64))
    x = s.clone().requires_grad_(True)
    for name in ("skew_kl", "skew_reverse_kl"):
        assert torch.autograd.gradcheck(lambda v, name=name: torch_distance(name, v, t, 2.0, 0.1), (x,))


def test_an_unset_beta_is_the_distances_own_and_a_set_one_wins():
    """loss.beta left unset trains each distance at its own default (the skewed KLs at 0.1,
    js at 0.5), through loss=<name> and through an LM variant alike; a set value wins."""
    import pytest

    from pipeline.losses import teacher_term
    from pipeline.tasks.lm.objective import Variant
    from tests.support import compose_config

    torch.manual_seed(1)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)

    def term(loss):
        return teacher_term(s, {"logits": t}, loss).item()

    def want(name, beta):  # (js runs its Numba kernel: equal to rounding)
        return pytest.approx(torch_distance(name, s, t, 2.0, beta).mean().item(), rel=1e-12)

    unset = compose_config("loss=skew_kl").loss
    assert unset.beta is None and term(unset) == want("skew_kl", 0.1)
    assert term(compose_config("loss=skew_reverse_kl", "loss.beta=0.3").loss) == want("skew_reverse_kl", 0.3)
    assert term(compose_config("loss=js").loss) == want("js", 0.5)
    assert term(compose_config("loss=js").loss) != want("js", 0.3)
    variant = Variant.parse("skew_reverse_kl").loss(compose_config("loss=js").loss)
    assert variant.beta is None and term(variant) == want("skew_reverse_kl", 0.1)
