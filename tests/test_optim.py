"""Adam against steps worked out by hand from the paper's formulas, and its state round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import adam_reference
from nanocolor.layers import Layer
from nanocolor.optim import Adam


class Params(Layer):
    """A stand-in layer holding given parameters and gradients."""

    def __init__(self, **params):
        super().__init__()
        self.params = {name: np.array(p, dtype=np.float64) for name, p in params.items()}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}


def test_first_step_moves_each_parameter_by_lr_against_its_gradient_sign():
    """With bias correction, step 1 is lr * g / (|g| + eps): lr * sign(g) whatever |g| is."""
    layer = Params(w=[1.0, -2.0, 0.5, 3.0])
    layer.grads["w"][:] = [1e-3, -5.0, 200.0, 0.0]
    Adam([layer], lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(layer.params["w"], [1.0 - 0.01, -2.0 + 0.01, 0.5 - 0.01, 3.0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("lr,betas,eps", [
    (1e-3, (0.9, 0.999), 1e-8),   # the defaults
    (0.1, (0.5, 0.9), 0.3),       # a large eps, so its bias-corrected placement matters
    (0.05, (0.0, 0.99), 1e-8),    # no momentum
])
def test_adam_matches_hand_computed_steps(lr, betas, eps):
    grads_w = [0.5, -1.5, 2.0, 0.25, -0.75, 1.0]
    grads_b = [3.0, 3.0, -0.1, 0.0, 10.0, -4.0]
    layer = Params(w=[0.3], b=[-1.2])
    adam = Adam([layer], lr=lr, betas=betas, eps=eps)
    expected_w = adam_reference(0.3, grads_w, lr, *betas, eps)
    expected_b = adam_reference(-1.2, grads_b, lr, *betas, eps)
    for t in range(len(grads_w)):
        layer.grads["w"][:] = grads_w[t]
        layer.grads["b"][:] = grads_b[t]
        adam.step()
        assert adam.t == t + 1
        assert layer.params["w"][0] == pytest.approx(expected_w[t], rel=1e-12, abs=1e-14)
        assert layer.params["b"][0] == pytest.approx(expected_b[t], rel=1e-12, abs=1e-14)


def test_two_hand_computed_steps_with_numbers():
    """lr 0.1, betas (0.5, 0.5), eps 0: g = 1 then g = 3, written out on paper.

    t=1: m=0.5, v=0.5, m_hat=1, v_hat=1 -> p = 1 - 0.1 = 0.9
    t=2: m=0.5*0.5+0.5*3=1.75, v=0.5*0.5+0.5*9=4.75, m_hat=1.75/0.75, v_hat=4.75/0.75
         -> p = 0.9 - 0.1 * (7/3) / sqrt(19/3)
    """
    layer = Params(w=[1.0])
    adam = Adam([layer], lr=0.1, betas=(0.5, 0.5), eps=0.0)
    layer.grads["w"][:] = 1.0
    adam.step()
    assert layer.params["w"][0] == pytest.approx(0.9, abs=1e-15)
    layer.grads["w"][:] = 3.0
    adam.step()
    assert layer.params["w"][0] == pytest.approx(0.9 - 0.1 * (7 / 3) / math.sqrt(19 / 3), abs=1e-15)


def test_adam_updates_every_layer_and_array_shape():
    rng = np.random.default_rng(0)
    layers = [Params(W=rng.standard_normal((3, 3, 2, 4)), b=rng.standard_normal(4)),
              Params(W=rng.standard_normal((1, 1, 4, 2)), b=rng.standard_normal(2))]
    before = [{n: p.copy() for n, p in layer.params.items()} for layer in layers]
    for layer in layers:
        for name, p in layer.params.items():
            layer.grads[name] = rng.standard_normal(p.shape)
    Adam(layers, lr=0.01).step()
    for layer, old in zip(layers, before):
        for name, p in layer.params.items():
            assert p.shape == old[name].shape
            # step 1 moves by lr * sign(g) (eps is negligible next to these |g|)
            np.testing.assert_allclose(p, old[name] - 0.01 * np.sign(layer.grads[name]), rtol=0, atol=1e-8)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((2, 3)) for _ in range(6)]
    start = rng.standard_normal((2, 3))

    straight = Params(w=start)
    adam = Adam([straight], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for g in grads:
        straight.grads["w"] = g.copy()
        adam.step()

    first = Params(w=start)
    adam1 = Adam([first], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for g in grads[:3]:
        first.grads["w"] = g.copy()
        adam1.step()
    state = {name: np.array(a, copy=True) for name, a in adam1.state_dict().items()}  # as saved to disk
    assert int(state["t"]) == 3

    resumed = Params(w=first.params["w"].copy())
    adam2 = Adam([resumed], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    adam2.load_state_dict(state)
    assert adam2.t == 3
    for g in grads[3:]:
        resumed.grads["w"] = g.copy()
        adam2.step()
    np.testing.assert_allclose(resumed.params["w"], straight.params["w"], rtol=1e-14, atol=0)

    fresh = Params(w=first.params["w"].copy())  # without the state, the moments restart: different
    adam3 = Adam([fresh], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for g in grads[3:]:
        fresh.grads["w"] = g.copy()
        adam3.step()
    assert not np.allclose(fresh.params["w"], straight.params["w"])


def test_load_state_dict_rejects_wrong_shapes():
    adam = Adam([Params(w=np.zeros((2, 3)))])
    state = Adam([Params(w=np.zeros((3, 2)))]).state_dict()
    with pytest.raises(ValueError):
        adam.load_state_dict(state)


def test_scheduled_lr_warms_up_linearly_then_follows_half_a_cosine_to_its_floor():
    from nanocolor.optim import COSINE_FLOOR, scheduled_lr
    lr, total, warmup = 0.5, 41, 8
    ramp = [scheduled_lr(lr, s, total, "cosine", warmup) for s in range(warmup)]
    np.testing.assert_allclose(ramp, [lr * (s + 1) / warmup for s in range(warmup)], rtol=1e-12)
    assert scheduled_lr(lr, warmup, total, "cosine", warmup) == pytest.approx(lr)  # the peak, right after
    middle = warmup + (total - warmup - 1) / 2  # a quarter turn: halfway between the peak and the floor
    assert scheduled_lr(lr, int(middle), total, "cosine", warmup) == pytest.approx(lr * (1 + COSINE_FLOOR) / 2)
    assert scheduled_lr(lr, total - 1, total, "cosine", warmup) == pytest.approx(lr * COSINE_FLOOR)
    decay = [scheduled_lr(lr, s, total, "cosine", warmup) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert [scheduled_lr(lr, s, total, "constant", 3) for s in (0, 2, 3, 40)] == [lr / 3, lr, lr, lr]
    with pytest.raises(ValueError, match="schedule must be one of"):
        scheduled_lr(lr, 0, total, "linear")
