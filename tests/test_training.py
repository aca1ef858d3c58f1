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
