"""Every layer's backward pass against central differences (float64, relative error < 1e-6), on
the textbook code and on every fast engine; the convolution against a slow loop reference, and
the whole network end to end."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GRAD_TOL, check_gradients, make_conv
from nanocolor import fast
from nanocolor.fast import gemm, winograd
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import Conv2d, MaxPool2d, ReLU, Tanh, Upsample2d
from nanocolor.loss import MSELoss
from nanocolor.model import ColorNet

# ---------------------------------------------------------------------------------------------
# Conv2d, on every engine

@pytest.fixture(params=["im2col", "gemm", "winograd"])
def engine(request):
    """The test runs once on the textbook code and once on each fast conv path."""
    with fast.use_engine(request.param):
        yield request.param


def expected_path(engine: str, k: int, H: int, W: int) -> str:
    """The code a conv must run under `engine`: Winograd only fits 3x3 kernels on even sizes."""
    if engine == "winograd" and not winograd.applies(k, H, W):
        return "gemm"
    return engine


CONV_CASES = [
    ((2, 5, 7, 3), 4, 3),    # odd H and W
    ((1, 4, 6, 1), 2, 3),    # batch 1, one input channel: the workers split image rows
    ((2, 4, 6, 3), 4, 3),    # even sizes, non-square: Winograd tiles
    ((1, 2, 2, 1), 2, 3),    # a single Winograd tile
    ((1, 6, 4, 5), 1, 3),    # one output channel
    ((2, 3, 5, 2), 3, 1),    # 1x1 kernel: the patch matrix is x itself
    ((1, 7, 5, 2), 3, 5),    # 5x5 kernel wider than padding on a small image
    ((1, 2, 3, 1), 1, 5),    # kernel larger than the image
    ((2, 5, 4, 8), 2, 3),    # 4F <= C: gemm multiplies first, then adds shifted slices
    ((2, 4, 4, 8), 2, 3),    # ... on even sizes
    ((1, 2, 3, 9), 2, 5),    # ... with a kernel larger than the image
]


@pytest.mark.parametrize("shape,c_out,k", CONV_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_conv_gradients(shape, c_out, k, input_grad, engine, rng, monkeypatch):
    """Every engine's forward and backward (with dx, or dW and db alone) against central
    differences, with the path that ran checked: no case silently falls back to another."""
    multiplied_first = []
    original = gemm.multiply_then_shift
    monkeypatch.setattr(gemm, "multiply_then_shift", lambda *a: multiplied_first.append(1) or original(*a))
    conv = make_conv(shape[-1], c_out, k)
    conv.input_grad = input_grad
    dx = check_gradients(conv, rng.standard_normal(shape), rng)
    path = expected_path(engine, k, *shape[1:3])
    assert conv.cache[0] == path
    assert bool(multiplied_first) == (path == "gemm" and 4 * c_out <= shape[-1] and k > 1)
    assert (dx is not None) == input_grad


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (2, 4, 6, 3)])
def test_conv_results_survive_other_layers_calls(rng, engine, shape):
    """Outputs, caches and gradients belong to their layer, not to scratch space that the next
    layer of the same shape overwrites: interleaved calls give the same numbers as lone ones."""
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    dout_a, dout_b = rng.standard_normal(shape), rng.standard_normal(shape)
    lone, a, b = make_conv(3, 3, 3, seed=0), make_conv(3, 3, 3, seed=0), make_conv(3, 3, 3, seed=5)
    out_lone = lone.forward(x).copy()
    dx_lone = lone.backward(dout_a.copy()).copy()
    dw_lone = lone.grads["W"].copy()

    out_a = a.forward(x)
    b.forward(y)
    dx_a = a.backward(dout_a.copy())
    b.backward(dout_b.copy())
    assert a.cache[0] == expected_path(engine, 3, *shape[1:3])
    np.testing.assert_array_equal(out_a, out_lone)
    np.testing.assert_array_equal(dx_a, dx_lone)
    np.testing.assert_array_equal(a.grads["W"], dw_lone)


def test_engine_knob_rejects_unknown_names_and_restores():
    assert fast.get_engine() == "auto"
    with pytest.raises(ValueError):
        fast.set_engine("winogard")
    with fast.use_engine("im2col"):
        assert fast.get_engine() == "im2col" and not fast.enabled()
    assert fast.get_engine() == "auto" and fast.enabled()


def slow_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Textbook 'same' convolution (cross-correlation), zero padding, stride 1, with loops.

    x (N, H, W, C), w (k, k, C, F), b (F,) -> (N, H, W, F).
    """
    N, H, W, C = x.shape
    k, F = w.shape[0], w.shape[-1]
    p = k // 2
    out = np.zeros((N, H, W, F))
    for n in range(N):
        for y in range(H):
            for xx in range(W):
                for f in range(F):
                    total = b[f]
                    for i in range(k):
                        for j in range(k):
                            yy, xj = y + i - p, xx + j - p
                            if 0 <= yy < H and 0 <= xj < W:
                                for c in range(C):
                                    total += x[n, yy, xj, c] * w[i, j, c, f]
                    out[n, y, xx, f] = total
    return out


@pytest.mark.parametrize("shape,c_out,k", [((2, 5, 7, 3), 4, 3), ((1, 6, 3, 1), 2, 5), ((2, 3, 4, 2), 3, 1)])
def test_conv_forward_matches_loop_reference(shape, c_out, k, engine, rng):
    conv = make_conv(shape[-1], c_out, k)
    x = rng.standard_normal(shape)
    expected = slow_conv(x, conv.params["W"], conv.params["b"])
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_conv_float32_forward_matches_reference(engine, rng):
    conv = Conv2d(3, 5, 3, rng=np.random.default_rng(0), dtype=np.float32)
    x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    out = conv.forward(x)
    assert out.dtype == np.float32
    expected = slow_conv(x.astype(np.float64), conv.params["W"].astype(np.float64), conv.params["b"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_single_pixel_impulse_gives_flipped_kernel(engine, rng):
    """A unit impulse in the middle of a zero image reproduces the kernel, spatially flipped."""
    conv = make_conv(1, 1, 3)
    x = np.zeros((1, 6, 6, 1))
    x[0, 2, 2, 0] = 1.0
    out = conv.forward(x)[0, 1:4, 1:4, 0] - conv.params["b"][0]
    np.testing.assert_allclose(out, conv.params["W"][::-1, ::-1, 0, 0], atol=1e-14)


def test_conv_he_init_and_even_kernel():
    conv = Conv2d(64, 128, 3, rng=np.random.default_rng(0))
    assert conv.params["W"].shape == (3, 3, 64, 128) and conv.params["b"].shape == (128,)
    assert np.all(conv.params["b"] == 0)
    # He init: std sqrt(2 / fan_in) with fan_in = 3*3*64
    assert abs(conv.params["W"].std() / np.sqrt(2 / 576) - 1) < 0.02
    with pytest.raises(ValueError):
        Conv2d(1, 1, 4)


# ---------------------------------------------------------------------------------------------
# MaxPool2d, Upsample2d and ReLU: the textbook code ("im2col" engine) and the fast one (any other)

@pytest.fixture(params=["im2col", "auto"], ids=["textbook", "fast"])
def code(request):
    """The cache tag the layer's forward must leave: which of the two codes ran."""
    with fast.use_engine(request.param):
        yield "textbook" if request.param == "im2col" else "fast"


def distinct_values(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Random values at least 1e-3 apart, so no window is near a tie while eps = 1e-6 probes it."""
    return rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape) * 1e-3 + rng.uniform(0, 1e-4)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 5, 7, 2), (2, 3, 3, 1), (1, 2, 2, 1)])
def test_maxpool_gradients(shape, code, rng):
    pool = MaxPool2d()
    check_gradients(pool, distinct_values(shape, rng), rng)
    assert pool.cache[0] == code


def test_maxpool_odd_size_drops_last_row_and_column(code, rng):
    x = rng.standard_normal((2, 5, 7, 3))
    pool = MaxPool2d()
    out = pool.forward(x)
    assert out.shape == (2, 2, 3, 3)
    expected = x[:, :4, :6].reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(out, expected)
    dx = pool.backward(np.ones_like(out))
    assert np.all(dx[:, 4, :, :] == 0) and np.all(dx[:, :, 6, :] == 0)  # dropped pixels get no gradient
    assert dx.sum() == out.size


def test_maxpool_ties_route_gradient_to_one_element(code):
    """A window of equal values passes its gradient to exactly one of them, not to all four."""
    x = np.zeros((1, 4, 4, 2))
    x[0, 2:, 2:, 1] = 5.0       # one window all tied at 5
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = 3.0  # two tied maxima in another
    pool = MaxPool2d()
    out = pool.forward(x)
    dout = np.arange(1, out.size + 1, dtype=np.float64).reshape(out.shape)
    dx = pool.backward(dout)
    windows = dx.reshape(1, 2, 2, 2, 2, 2)
    assert np.count_nonzero(dx) == out.size  # one receiver per window
    np.testing.assert_array_equal(windows.sum(axis=(2, 4)), dout)  # nothing lost, nothing doubled
    # the receiver is a maximum of its window
    receivers = windows != 0
    window_x = x.reshape(1, 2, 2, 2, 2, 2)
    assert np.all(window_x[receivers] == np.broadcast_to(out[:, :, None, :, None, :], window_x.shape)[receivers])


# ---------------------------------------------------------------------------------------------
# Upsample2d, ReLU, Tanh

@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (1, 1, 1, 1), (1, 4, 2, 3)])
def test_upsample_gradients(shape, code, rng):
    up = Upsample2d()
    check_gradients(up, rng.standard_normal(shape), rng)
    assert up.cache[0] == code


def test_upsample_is_nearest_neighbour(code, rng):
    x = rng.standard_normal((2, 3, 5, 2))
    out = Upsample2d().forward(x)
    assert out.shape == (2, 6, 10, 2)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))


def away_from_zero(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Random values with |x| >= 0.1: ReLU's kink at 0 stays far from the finite-difference probes."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.1, 0.1 * np.sign(x) + 0.1 * (x == 0), x)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 1)])
def test_relu_gradients(shape, code, rng):
    relu = ReLU()
    check_gradients(relu, away_from_zero(shape, rng), rng)
    assert relu.cache[0] == code


def test_relu_forward(code, rng):
    x = away_from_zero((2, 3, 3, 2), rng)
    np.testing.assert_array_equal(ReLU().forward(x), np.where(x > 0, x, 0))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 1)])
def test_tanh_gradients(shape, rng):
    check_gradients(Tanh(), 1.5 * rng.standard_normal(shape), rng)


# ---------------------------------------------------------------------------------------------
# Loss

@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (1, 1, 1, 1)])
def test_mse_loss_value_and_gradient(shape, rng):
    pred, target = rng.standard_normal(shape), rng.standard_normal(shape)
    loss = MSELoss()
    value = loss.forward(pred, target)
    assert value == pytest.approx(np.sum((pred - target) ** 2) / pred.size, rel=1e-12)
    dpred = loss.backward()
    numeric = numeric_gradient(lambda: MSELoss().forward(pred, target), pred)
    assert relative_error(dpred, numeric) < GRAD_TOL


def test_mse_loss_is_zero_for_equal_inputs(rng):
    x = rng.standard_normal((2, 2, 2, 2))
    loss = MSELoss()
    assert loss.forward(x, x.copy()) == 0.0
    assert np.all(loss.backward() == 0)


# ---------------------------------------------------------------------------------------------
# backward leaves dout alone

@pytest.mark.parametrize("make_layer,shape", [
    (lambda: make_conv(2, 3, 3), (2, 5, 3, 2)),
    (MaxPool2d, (2, 5, 3, 2)),
    (Upsample2d, (2, 5, 3, 2)),
    (ReLU, (2, 5, 3, 2)),
    (Tanh, (2, 5, 3, 2)),
], ids=["conv", "maxpool", "upsample", "relu", "tanh"])
def test_backward_does_not_modify_dout(make_layer, shape, engine, rng):
    layer = make_layer()
    x = rng.standard_normal(shape)
    x_before = x.copy()
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dout_before = dout.copy()
    layer.backward(dout)
    np.testing.assert_array_equal(dout, dout_before)
    np.testing.assert_array_equal(x, x_before)  # forward does not touch its input either


# ---------------------------------------------------------------------------------------------
# The whole network

@pytest.mark.parametrize("widths,kernel,shape", [
    ((3, 4), 3, (2, 4, 6, 1)),      # one pool/upsample level, non-square
    ((2, 3, 4), 3, (1, 4, 8, 1)),   # two levels, batch 1
    ((3,), 5, (2, 3, 5, 1)),        # no pooling: odd sizes, 5x5 kernels
])
def test_colornet_end_to_end_gradients(widths, kernel, shape, engine, rng):
    """d MSE / d every parameter of a tiny float64 ColorNet, by backprop vs central differences."""
    model = ColorNet(widths, kernel=kernel, seed=3, dtype=np.float64, arch="seed").train()
    for layer in model.param_layers:  # non-zero biases so their gradients are exercised too
        layer.params["b"] = rng.standard_normal(layer.params["b"].shape) * 0.1
    lightness = rng.uniform(-1, 1, shape)
    ab_true = rng.uniform(-0.5, 0.5, shape[:3] + (2,))
    loss = MSELoss()
    f = lambda: MSELoss().forward(model.forward(lightness), ab_true)

    ab_pred = model.forward(lightness)
    assert ab_pred.shape == shape[:3] + (2,) and ab_pred.dtype == np.float64
    loss.forward(ab_pred, ab_true)
    model.backward(loss.backward())
    analytic = [{name: np.array(g, copy=True) for name, g in layer.grads.items()} for layer in model.param_layers]

    assert len(analytic) == 2 * len(widths)
    for i, layer in enumerate(model.param_layers):
        for name, p in layer.params.items():
            err = relative_error(analytic[i][name], numeric_gradient(f, p))
            assert err < GRAD_TOL, f"layer {i} d{name}: relative error {err:.2e}"
