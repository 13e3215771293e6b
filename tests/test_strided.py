"""The fast engine's strided convs (nanocolor/fast/strided.py) and its runner of the GAN's critic
(fast.Critic) against the textbook: Conv2d with a stride or a padding other than 'same',
LeakyReLU, and the whole critic's logits, input gradient and parameter gradients, in float64,
with one worker and several."""
from __future__ import annotations

import numpy as np
import pytest

from nanocolor import engine, fast
from nanocolor.fast import conv as fast_conv, network, strided
from nanocolor.fast.helpers import leaky_relu_into
from nanocolor.fast.resample import leaky_relu_backward
from nanocolor.gan import PatchCritic
from test_gan import float64_critic
from nanocolor.layers import BatchNorm2d, Conv2d, LeakyReLU

STRIDED_CASES = [  # (shape, c_out, k, stride, padding)
    ((2, 7, 9, 3), 4, 3, 2, 1),    # odd sizes: the last input row and column reach one patch only
    ((3, 8, 8, 5), 6, 3, 2, 1),    # the critic's halving on even sizes
    ((1, 9, 6, 2), 3, 4, 2, 1),    # pix2pix's 4x4 stride 2: an even kernel
    ((2, 10, 11, 3), 2, 3, 3, 0),  # stride 3 without padding: pixels no patch reaches
    ((1, 5, 5, 4), 3, 3, 1, 0),    # stride 1 without padding: a 'valid' conv
    ((2, 6, 6, 2), 3, 5, 2, 2),    # a 5x5 kernel, padding 2
    ((1, 3, 3, 2), 2, 3, 2, 1),    # a 2x2 output from a 3x3 image
    ((5, 8, 6, 1), 5, 3, 2, 1),    # one input channel, more images than pieces
    ((2, 9, 7, 8), 3, 3, 2, 1),    # 8 channels and more: dx by channels-last phases
    ((1, 8, 10, 12), 4, 4, 2, 1),  # ... with an even kernel
    ((3, 11, 8, 9), 2, 3, 3, 0),   # ... stride 3 without padding
]


def textbook(conv: Conv2d, slope, x, dout, input_grad: bool) -> tuple:
    """(out, dx, dW, db) of the textbook Conv2d, then a LeakyReLU unless slope is None."""
    conv.input_grad = input_grad
    act = LeakyReLU(slope) if slope is not None else None
    out = conv.forward(x)
    if act is not None:
        out = act.forward(out)
    dx = conv.backward(act.backward(dout) if act is not None else dout)
    return out, dx, conv.grads["W"], conv.grads["b"]


def random_conv(shape, c_out, k, stride, padding, rng) -> Conv2d:
    conv = Conv2d(shape[-1], c_out, k, rng=rng, dtype=np.float64, stride=stride, padding=padding)
    conv.params["b"] = rng.standard_normal(c_out)
    return conv


@pytest.mark.parametrize("shape,c_out,k,stride,padding", STRIDED_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("slope", [None, 0.2])
def test_strided_conv_matches_textbook(shape, c_out, k, stride, padding, input_grad, slope, workers, rng):
    conv = random_conv(shape, c_out, k, stride, padding, rng)
    x = rng.standard_normal(shape)
    out, _ = strided.forward(x, conv.params["W"], conv.params["b"], stride, padding, slope)
    dout = rng.standard_normal(out.shape)
    expected = textbook(conv, slope, x, dout, input_grad)
    d_conv = dout if slope is None else leaky_relu_backward(dout, out, slope)
    out, cache = strided.forward(x, conv.params["W"], conv.params["b"], stride, padding, slope)
    got = (out, *strided.backward(d_conv, cache, conv.params["W"], input_grad))
    for name, a, b in zip(("out", "dx", "dW", "db"), got, expected):
        if b is None:
            assert a is None, name
        else:
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 2, 3), (4, 6)])
def test_leaky_relu_matches_the_textbook_layer(shape, workers, rng):
    x = rng.standard_normal(shape)
    x.flat[::3] = 0  # at 0 the textbook takes the negative side (slope)
    layer = LeakyReLU(0.2)
    out, dout = layer.forward(x), rng.standard_normal(shape)
    fast_out = x.copy()
    leaky_relu_into(fast_out, 0.2)
    np.testing.assert_array_equal(fast_out, out)
    np.testing.assert_allclose(leaky_relu_backward(dout, out, 0.2), layer.backward(dout), rtol=1e-15)


@pytest.mark.parametrize("widths,shape", [((4, 6, 8), (2, 17, 23)), ((3, 5), (3, 16, 16)),
                                          ((4, 6, 8, 5), (2, 32, 20)), ((16, 32, 32), (2, 16, 24))])
@pytest.mark.parametrize("conv", ["gemm", "winograd", "winograd4", "auto"])
def test_critic_runner_matches_the_textbook_critic(conv, widths, shape, workers, rng):
    """Logits, d/d ab and every parameter gradient, with and without the input gradient."""
    critic = float64_critic(widths)
    lightness, ab = rng.uniform(-1, 1, (*shape, 1)), rng.uniform(-1, 1, (*shape, 2))
    logits = critic.forward(lightness, ab)
    d_logits = rng.standard_normal(logits.shape)
    d_ab = critic.backward(d_logits)
    grads = [g.copy() for layer in critic.param_layers for g in layer.grads.values()]
    with engine.use_conv(conv):
        runner = engine.network(critic)
    assert isinstance(runner, fast.Critic) and [block.conv.same for block in runner.blocks] == \
        [False] * (len(widths) - 1) + [True, True]
    np.testing.assert_allclose(runner.forward(lightness, ab), logits, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(runner.backward(d_logits), d_ab, rtol=1e-11, atol=1e-12)
    for got, expected in zip([g for layer in critic.param_layers for g in layer.grads.values()], grads):
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)
    runner.forward(lightness, ab)
    assert runner.backward(d_logits, input_grad=False) is None
    for got, expected in zip([g for layer in critic.param_layers for g in layer.grads.values()], grads):
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


def test_critic_is_itself_under_the_textbook():
    critic = PatchCritic((4, 6))
    with engine.use_conv("im2col"):
        assert engine.network(critic) is critic


def test_critic_runner_backward_needs_a_forward(rng):
    with pytest.raises(RuntimeError, match="forward pass first"):
        engine.network(PatchCritic((4, 6))).backward(rng.standard_normal((1, 2, 2, 1)))


def test_blocks_take_a_leaky_relu_after_a_conv_only_without_batchnorm():
    conv = Conv2d(2, 3, 3, bias=False)
    assert network.Block([conv, LeakyReLU(0.1)]).leaky.slope == 0.1
    with pytest.raises(ValueError, match="LeakyReLU"):
        network.Block([conv, BatchNorm2d(3), LeakyReLU()])


@pytest.mark.parametrize("path", ["gemm", "winograd", "winograd4"])
def test_same_conv_leaky_relu_matches_textbook(path, workers, rng):
    """A 'same' conv then LeakyReLU: in Winograd F(4x4)'s epilogue, or one more pass after the others."""
    conv = random_conv((2, 8, 8, 4), 6, 3, 1, 1, rng)
    x = rng.standard_normal((2, 8, 8, 4))
    expected = LeakyReLU(0.2).forward(conv.forward(x))
    for inference in (False, True):
        out, _ = fast_conv.conv2d_forward(x, conv.params["W"], conv.params["b"], path, inference=inference, slope=0.2)
        np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-12)
