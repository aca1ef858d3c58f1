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
