"""The one training loop: steps over epochs of a resumable stream, resume to the same
weights from any checkpoint, divergence stops with advice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tasks.classify import LabelStream, ce_loss
from pipeline.training import train


class Interrupt(Exception):
    pass


def _data(n: int = 70):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("kill_at,every", [(9, 0), (11, 4), (17, 3)])
def test_a_run_killed_at_any_step_resumes_to_the_same_steps_and_weights(tmp_path, kill_at, every):
    """Killed mid-epoch (the checkpoint is the epoch's end or the last `every` steps), the
    resumed run ends with the uninterrupted run's weights, bit for bit."""
    x, y = _data()
    steps = 20  # 7 batches of 10 per epoch: the run crosses two epoch ends

    fresh = _model()
    done, _ = train(fresh, LabelStream(x, y, 10, seed=3), steps, ce_loss, lr=1e-2, weight_decay=0.0, desc="fresh")
    assert done == steps

    state = str(tmp_path / "state.pt")
    calls = {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Interrupt
        return ce_loss(model, batch)

    with pytest.raises(Interrupt):
        train(_model(), LabelStream(x, y, 10, seed=3), steps, dying, lr=1e-2, weight_decay=0.0, desc="killed",
              state_path=state, checkpoint_every=every)
    saved = torch.load(state, weights_only=False)["step"]
    assert 0 < saved < kill_at
    resumed = _model()
    done, _ = train(resumed, LabelStream(x, y, 10, seed=3), steps, ce_loss, lr=1e-2, weight_decay=0.0,
                    desc="resumed", state_path=state, checkpoint_every=every)
    assert done == steps
    for a, b in zip(fresh.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    again = _model()  # a finished run is not trained again
    assert train(again, LabelStream(x, y, 10, seed=3), steps, ce_loss, lr=1e-2, weight_decay=0.0, desc="done",
                 state_path=state)[0] == steps
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_a_diverging_loss_stops_training_with_advice():
    x, y = _data()

    def exploding(model, batch):
        return ce_loss(model, batch) * float("nan")

    with pytest.raises(RuntimeError, match=r"diverged \(loss=nan\); lower the learning rate"):
        train(_model(), LabelStream(x, y, 10, seed=0), 60, exploding, lr=1e-2, weight_decay=0.0, desc="nan")


def test_an_empty_stream_is_an_error_not_a_hang():
    class Empty:
        epoch, position = 0, 0

        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="yielded no batch"):
        train(_model(), Empty(), 5, ce_loss, lr=1e-2, weight_decay=0.0, desc="empty")


def test_accumulating_two_half_batches_is_one_whole_batch():
    """A step over 2 x 10 rows with accumulate=2 moves the weights as one step over the same
    20 rows (mean losses of equal halves: equal gradients, up to float rounding)."""
    x, y = _data(80)

    class Halves(LabelStream):  # the same rows as a batch-20 stream, served in halves
        def __iter__(self):
            for xb, yb, t in LabelStream.__iter__(self):
                yield xb[:10], yb[:10], t
                yield xb[10:], yb[10:], t

    whole, halves = _model(), _model()
    train(whole, LabelStream(x, y, 20, seed=1), 8, ce_loss, lr=1e-2, weight_decay=0.0, desc="whole")
    train(halves, Halves(x, y, 20, seed=1), 8, ce_loss, lr=1e-2, weight_decay=0.0, desc="halves", accumulate=2)
    for a, b in zip(whole.state_dict().values(), halves.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_warmup_then_cosine_schedule():
    from pipeline.training import make_optimizer

    opt, sched = make_optimizer(_model(), lr=1.0, weight_decay=0.0, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lrs[4:], 0.5 * (1 + np.cos(np.pi * np.arange(7) / 6)), atol=1e-12)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_clipping_bounds_the_gradient_norm_at_every_step(monkeypatch):
    x, y = _data()
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm):
        params = list(params)
        real(params, max_norm)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    train(_model(), LabelStream(x, y, 10, seed=0), 6, ce_loss, lr=1e-2, weight_decay=0.0, desc="clip", clip_norm=0.05)
    assert len(norms) == 6 and max(norms) <= 0.05 + 1e-6


def test_a_resumed_run_with_accumulation_ends_where_an_uninterrupted_one_does(tmp_path):
    x, y = _data()
    fresh = _model()
    train(fresh, LabelStream(x, y, 10, seed=3), 9, ce_loss, lr=1e-2, weight_decay=0.0, desc="fresh", accumulate=2)
    state, calls = str(tmp_path / "state.pt"), {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 13:  # mid-step, after the checkpoint at step 4 (8 batches)
            raise Interrupt
        return ce_loss(model, batch)

    with pytest.raises(Interrupt):
        train(_model(), LabelStream(x, y, 10, seed=3), 9, dying, lr=1e-2, weight_decay=0.0, desc="killed",
              state_path=state, checkpoint_every=2, accumulate=2)
    resumed = _model()
    train(resumed, LabelStream(x, y, 10, seed=3), 9, ce_loss, lr=1e-2, weight_decay=0.0, desc="resumed",
          state_path=state, checkpoint_every=2, accumulate=2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))


def test_bf16_autocast_trains_on_cpu():
    x, y = _data()
    _, loss = train(_model(), LabelStream(x, y, 10, seed=0), 50, ce_loss, lr=1e-2, weight_decay=0.0, desc="bf16",
                    precision="bf16")
    assert np.isfinite(loss)
