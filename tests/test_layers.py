"""The textbook (nanocolor/layers.py, model.py) on its own, no engine involved: every layer's
backward pass against central differences (float64, relative error < 1e-6), the convolution
against a slow loop reference, BatchNorm's running statistics, and the whole network (seed and
U-Net) end to end. The fast engine against these layers: tests/test_fast.py."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GRAD_TOL, check_gradients, make_conv
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import (BatchNorm2d, Concat, Conv2d, GlobalAvgPool2d, LeakyReLU, Linear, MaxPool2d, ReLU, Tanh,
                              Upsample2d,
                              conv_output_size)
from nanocolor.loss import BCEWithLogitsLoss, ChromaMatchedMSELoss, MSELoss, PhotoLogMSELoss
from nanocolor.model import ColorNet

# ---------------------------------------------------------------------------------------------
# Conv2d

CONV_CASES = [
    ((2, 5, 7, 3), 4, 3),    # odd H and W
    ((1, 4, 6, 1), 2, 3),    # batch 1, one input channel
    ((2, 4, 6, 3), 4, 3),    # even sizes, non-square
    ((1, 2, 2, 1), 2, 3),    # a 2x2 image under a 3x3 kernel
    ((1, 6, 4, 5), 1, 3),    # one output channel
    ((2, 3, 5, 2), 3, 1),    # 1x1 kernel: the patch matrix is x itself
    ((1, 7, 5, 2), 3, 5),    # 5x5 kernel wider than padding on a small image
    ((1, 2, 3, 1), 1, 5),    # kernel larger than the image
    ((2, 5, 4, 8), 2, 3),    # more input channels than outputs
    ((1, 2, 3, 9), 2, 5),    # ... with a kernel larger than the image
]


@pytest.mark.parametrize("shape,c_out,k", CONV_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_conv_gradients(shape, c_out, k, input_grad, rng):
    """Forward and backward (with dx, or dW and db alone) against central differences."""
    conv = make_conv(shape[-1], c_out, k)
    conv.input_grad = input_grad
    dx = check_gradients(conv, rng.standard_normal(shape), rng)
    assert (dx is not None) == input_grad


def test_conv_without_bias_has_no_bias_gradient(rng):
    conv = Conv2d(3, 4, 3, rng=np.random.default_rng(0), dtype=np.float64, bias=False)
    check_gradients(conv, rng.standard_normal((2, 4, 5, 3)), rng)
    assert set(conv.grads) == {"W"} and np.all(conv.bias == 0)


def slow_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, padding: int | None = None) -> np.ndarray:
    """Textbook convolution (cross-correlation), zero padding ('same' by default), with loops.

    x (N, H, W, C), w (k, k, C, F), b (F,) -> (N, Ho, Wo, F), Ho = (H + 2p - k) // stride + 1.
    """
    N, H, W, C = x.shape
    k, F = w.shape[0], w.shape[-1]
    p = k // 2 if padding is None else padding
    Ho, Wo = (H + 2 * p - k) // stride + 1, (W + 2 * p - k) // stride + 1
    out = np.zeros((N, Ho, Wo, F))
    for n in range(N):
        for y in range(Ho):
            for xx in range(Wo):
                for f in range(F):
                    total = b[f]
                    for i in range(k):
                        for j in range(k):
                            yy, xj = stride * y + i - p, stride * xx + j - p
                            if 0 <= yy < H and 0 <= xj < W:
                                for c in range(C):
                                    total += x[n, yy, xj, c] * w[i, j, c, f]
                    out[n, y, xx, f] = total
    return out


@pytest.mark.parametrize("shape,c_out,k", [((2, 5, 7, 3), 4, 3), ((1, 6, 3, 1), 2, 5), ((2, 3, 4, 2), 3, 1)])
def test_conv_forward_matches_loop_reference(shape, c_out, k, rng):
    conv = make_conv(shape[-1], c_out, k)
    x = rng.standard_normal(shape)
    expected = slow_conv(x, conv.params["W"], conv.params["b"])
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_conv_float32_forward_matches_reference(rng):
    conv = Conv2d(3, 5, 3, rng=np.random.default_rng(0), dtype=np.float32)
    x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    out = conv.forward(x)
    assert out.dtype == np.float32
    expected = slow_conv(x.astype(np.float64), conv.params["W"].astype(np.float64), conv.params["b"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_single_pixel_impulse_gives_flipped_kernel(rng):
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
    assert Conv2d(1, 1, 4, padding=1).same is False  # an even kernel needs its padding spelled out


# ---------------------------------------------------------------------------------------------
# Strided and non-'same' convolutions (the critic's)

STRIDED_CASES = [  # (input shape, F, k, stride, padding)
    ((2, 6, 6, 3), 4, 4, 2, 1),    # pix2pix's downsampling conv: 6x6 -> 3x3
    ((2, 7, 5, 3), 2, 4, 2, 1),    # odd sizes: the last row of the padded input is in no patch
    ((1, 5, 9, 2), 3, 3, 2, 1),    # 3x3 stride 2, odd sizes
    ((1, 8, 7, 2), 2, 3, 3, 0),    # stride 3, no padding: rows and columns left over at the edge
    ((2, 5, 4, 3), 1, 4, 1, 1),    # pix2pix's last conv: 4x4 stride 1 pad 1, one output channel
    ((1, 3, 4, 2), 2, 4, 2, 1),    # one row of patches: the kernel spans the padded input
    ((1, 4, 4, 1), 2, 2, 2, 0),    # 2x2 stride 2 without padding: the patches tile the input
    ((1, 3, 3, 2), 2, 5, 1, 1),    # kernel larger than the input: one patch, partly padding
]


@pytest.mark.parametrize("shape,c_out,k,stride,padding", STRIDED_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_strided_conv_gradients(shape, c_out, k, stride, padding, input_grad, rng):
    """The strided (and any non-'same') conv against central differences."""
    conv = Conv2d(shape[-1], c_out, k, rng=np.random.default_rng(0), dtype=np.float64, stride=stride, padding=padding)
    conv.params["b"] = rng.standard_normal(c_out)
    conv.input_grad = input_grad
    dx = check_gradients(conv, rng.standard_normal(shape), rng)
    assert not conv.same
    assert (dx is not None) == input_grad
    Ho, Wo = conv_output_size(shape[1], k, stride, padding), conv_output_size(shape[2], k, stride, padding)
    assert conv.forward(rng.standard_normal(shape)).shape == (shape[0], Ho, Wo, c_out)


@pytest.mark.parametrize("shape,c_out,k,stride,padding", STRIDED_CASES[:5])
def test_strided_conv_forward_matches_loop_reference(shape, c_out, k, stride, padding, rng):
    conv = Conv2d(shape[-1], c_out, k, rng=np.random.default_rng(0), dtype=np.float64, stride=stride, padding=padding)
    conv.params["b"] = rng.standard_normal(c_out)
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(conv.forward(x), slow_conv(x, conv.params["W"], conv.params["b"], stride, padding),
                               rtol=1e-12, atol=1e-12)


def test_strided_conv_gives_no_gradient_to_pixels_in_no_patch(rng):
    """Stride 3 over 8 rows without padding reads rows 0..5 only: rows 6 and 7 get zero gradient."""
    conv = Conv2d(1, 1, 3, rng=np.random.default_rng(0), dtype=np.float64, stride=3, padding=0)
    x = rng.standard_normal((1, 8, 8, 1))
    dx = conv.backward(np.ones_like(conv.forward(x)))
    assert np.all(dx[:, 6:] == 0) and np.all(dx[:, :, 6:] == 0) and np.all(dx[:, :6, :6] != 0)


def test_conv_output_size_and_too_small_inputs():
    assert conv_output_size(64, 4, 2, 1) == 32 and conv_output_size(63, 4, 2, 1) == 31
    assert conv_output_size(16, 4, 1, 1) == 15 and conv_output_size(9, 3) == 7
    assert [conv_output_size(n, 3, 1, 1) for n in (1, 5, 8)] == [1, 5, 8]  # 'same'
    conv = Conv2d(1, 1, 4, stride=1, padding=0)
    with pytest.raises(ValueError, match="at least 4 pixels"):
        conv.forward(np.zeros((1, 3, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError):
        Conv2d(1, 1, 3, stride=0)


# ---------------------------------------------------------------------------------------------
# MaxPool2d

def distinct_values(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Random values at least 1e-3 apart, so no window is near a tie while eps = 1e-6 probes it."""
    return rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape) * 1e-3 + rng.uniform(0, 1e-4)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 5, 7, 2), (2, 3, 3, 1), (1, 2, 2, 1)])
def test_maxpool_gradients(shape, rng):
    check_gradients(MaxPool2d(), distinct_values(shape, rng), rng)


def test_maxpool_odd_size_drops_last_row_and_column(rng):
    x = rng.standard_normal((2, 5, 7, 3))
    pool = MaxPool2d()
    out = pool.forward(x)
    assert out.shape == (2, 2, 3, 3)
    expected = x[:, :4, :6].reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(out, expected)
    dx = pool.backward(np.ones_like(out))
    assert np.all(dx[:, 4, :, :] == 0) and np.all(dx[:, :, 6, :] == 0)  # dropped pixels get no gradient
    assert dx.sum() == out.size


def test_maxpool_ties_route_gradient_to_one_element():
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
def test_upsample_gradients(shape, rng):
    check_gradients(Upsample2d(), rng.standard_normal(shape), rng)


def test_upsample_is_nearest_neighbour(rng):
    x = rng.standard_normal((2, 3, 5, 2))
    out = Upsample2d().forward(x)
    assert out.shape == (2, 6, 10, 2)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))


def away_from_zero(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Random values with |x| >= 0.1: ReLU's kink at 0 stays far from the finite-difference probes."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.1, 0.1 * np.sign(x) + 0.1 * (x == 0), x)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 1)])
def test_relu_gradients(shape, rng):
    check_gradients(ReLU(), away_from_zero(shape, rng), rng)


def test_relu_forward(rng):
    x = away_from_zero((2, 3, 3, 2), rng)
    np.testing.assert_array_equal(ReLU().forward(x), np.where(x > 0, x, 0))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 1)])
@pytest.mark.parametrize("slope", [0.2, 0.01])
def test_leaky_relu_gradients(shape, slope, rng):
    check_gradients(LeakyReLU(slope), away_from_zero(shape, rng), rng)


def test_leaky_relu_forward(rng):
    x = away_from_zero((2, 3, 3, 2), rng)
    out = LeakyReLU().forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.2 * x))
    assert LeakyReLU().forward(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 1)])
def test_tanh_gradients(shape, rng):
    check_gradients(Tanh(), 1.5 * rng.standard_normal(shape), rng)


# ---------------------------------------------------------------------------------------------
# BatchNorm2d (training mode: the batch's statistics) and Concat

def batchnorm64(channels: int, rng: np.random.Generator, momentum: float = 0.1) -> BatchNorm2d:
    """A float64 BatchNorm2d in training mode with random gamma and beta (away from the identity
    start, so every term of its backward matters)."""
    bn = BatchNorm2d(channels, momentum=momentum, dtype=np.float64)
    bn.params["gamma"] = rng.uniform(0.5, 2, channels) * rng.choice([-1, 1], channels)
    bn.params["beta"] = rng.standard_normal(channels)
    return bn


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 2, 7, 1), (1, 5, 3, 2), (2, 1, 2, 3)])
def test_batchnorm_gradients_in_training(shape, rng):
    """dx, dgamma and dbeta with the batch's mean and variance, which depend on every input."""
    bn = batchnorm64(shape[-1], rng)
    assert bn.training
    check_gradients(bn, rng.standard_normal(shape) * 3 + 1, rng)


def test_batchnorm_training_output_and_running_statistics(rng):
    """Training normalizes each channel by the batch's mean and biased variance; the running
    statistics follow running = (1 - m) running + m batch, the variance unbiased (n - 1), over
    several steps; inference then uses them alone, and backward refuses to run."""
    m, eps = 0.3, 1e-5
    bn = batchnorm64(3, rng, momentum=m)
    gamma, beta = bn.params["gamma"], bn.params["beta"]
    running_mean, running_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = rng.standard_normal((2, 4, 5, 3)) * np.array([1, 2, 3]) + np.array([-1, 0, 4]) * (step + 1)
        rows = x.reshape(-1, 3)
        mean, var = rows.mean(axis=0), rows.var(axis=0)
        np.testing.assert_allclose(bn.forward(x), gamma * (x - mean) / np.sqrt(var + eps) + beta,
                                   rtol=1e-12, atol=1e-12)
        running_mean = (1 - m) * running_mean + m * mean
        running_var = (1 - m) * running_var + m * rows.var(axis=0, ddof=1)
        np.testing.assert_allclose(bn.buffers["running_mean"], running_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.buffers["running_var"], running_var, rtol=1e-12, atol=1e-14)
    bn.training = False
    single = rng.standard_normal((1, 3, 2, 3))  # one photo alone: its output does not depend on a batch
    expected = gamma * (single - running_mean) / np.sqrt(running_var + eps) + beta
    np.testing.assert_allclose(bn.forward(single), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(bn.buffers["running_mean"], running_mean)  # inference leaves them alone
    with pytest.raises(RuntimeError, match="training mode"):
        bn.backward(single)


def test_concat_joins_channels_and_splits_the_gradient(rng):
    a, b = rng.standard_normal((2, 3, 5, 2)), rng.standard_normal((2, 3, 5, 3))
    cat = Concat()
    out = cat.forward(a, b)
    np.testing.assert_array_equal(out, np.concatenate([a, b], axis=-1))
    dout = rng.standard_normal(out.shape)
    da, db = cat.backward(dout)
    f = lambda: float(np.sum(cat.forward(a, b) * dout))
    assert relative_error(da, numeric_gradient(f, a)) < GRAD_TOL
    assert relative_error(db, numeric_gradient(f, b)) < GRAD_TOL
    np.testing.assert_array_equal(np.concatenate([da, db], axis=-1), dout)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 1), (3, 7, 2, 1)])
def test_global_avg_pool_gradients_and_means(shape, rng):
    x = rng.standard_normal(shape)
    pool = GlobalAvgPool2d()
    np.testing.assert_allclose(pool.forward(x), x.reshape(shape[0], -1, shape[-1]).mean(axis=1), rtol=1e-12)
    check_gradients(pool, x, rng)


@pytest.mark.parametrize("n,f_in,f_out", [(2, 5, 3), (1, 1, 1), (7, 4, 9)])
def test_linear_gradients_and_output(n, f_in, f_out, rng):
    layer = Linear(f_in, f_out, rng=rng, dtype=np.float64)
    layer.params["b"] = rng.standard_normal(f_out)  # a non-zero bias, so the forward's check sees it added
    x = rng.standard_normal((n, f_in))
    np.testing.assert_allclose(layer.forward(x), np.einsum("nf,fk->nk", x, layer.params["W"]) + layer.params["b"],
                               rtol=1e-12)
    check_gradients(layer, x, rng)


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


@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (3, 1, 1, 2), (1, 4, 3, 2)])
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_chroma_matched_mse_value_and_gradient(shape, lam, rng):
    pred, target = rng.standard_normal(shape), 2 * rng.standard_normal(shape)
    loss = ChromaMatchedMSELoss(lam)
    value = loss.forward(pred, target)
    rms = lambda x: np.sqrt(np.mean(x.reshape(len(x), -1) ** 2, axis=1) + ChromaMatchedMSELoss.EPS)
    expected = np.mean((pred - target) ** 2) + lam * np.mean((rms(pred) - rms(target)) ** 2)
    assert value == pytest.approx(expected, rel=1e-12)
    dpred = loss.backward()
    numeric = numeric_gradient(lambda: ChromaMatchedMSELoss(lam).forward(pred, target), pred)
    assert relative_error(dpred, numeric) < GRAD_TOL


def test_chroma_matched_mse_pulls_a_dull_prediction_outwards(rng):
    """A prediction pointing the right way at half the truth's chroma: plain MSE and the chroma
    term both push it outwards along itself, and with lam 0 the loss is MSE exactly."""
    target = rng.standard_normal((2, 3, 3, 2))
    pred = 0.5 * target
    plain, matched = MSELoss(), ChromaMatchedMSELoss(2.0)
    assert ChromaMatchedMSELoss(0.0).forward(pred, target) == plain.forward(pred, target)
    matched.forward(pred, target)
    extra = matched.backward() - plain.backward()
    # the extra gradient is a negative multiple of pred itself, per photo: descent scales it up
    for n in range(2):
        ratio = extra[n] / pred[n]
        assert np.all(ratio < 0)
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-12)
    # an all-gray prediction gets a finite gradient (no 0 / 0)
    gray = np.zeros_like(target)
    matched.forward(gray, target)
    assert np.all(np.isfinite(matched.backward()))


@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (3, 1, 1, 2), (1, 4, 3, 2)])
@pytest.mark.parametrize("scale", [1.0, 0.01])  # errors far above and near the floor EPS
def test_photo_log_mse_value_and_gradient(shape, scale, rng):
    pred, target = scale * rng.standard_normal(shape), scale * rng.standard_normal(shape)
    loss = PhotoLogMSELoss()
    value = loss.forward(pred, target)
    per_photo = np.mean(((pred - target) ** 2).reshape(len(pred), -1), axis=1)
    assert value == pytest.approx(np.mean(np.log(per_photo + PhotoLogMSELoss.EPS)), rel=1e-12)
    dpred = loss.backward()
    numeric = numeric_gradient(lambda: PhotoLogMSELoss().forward(pred, target), pred)
    assert relative_error(dpred, numeric) < GRAD_TOL


def test_photo_log_mse_weighs_an_error_by_how_right_its_photo_is(rng):
    """The same wrong pixel costs more in a photo that is otherwise right than in one that is
    wrong anyway; plain MSE pushes both alike."""
    target = np.zeros((2, 4, 4, 2))
    pred = target.copy()
    pred[1] = 0.5 * rng.standard_normal((4, 4, 2))      # photo 1 wrong everywhere
    pred[:, 0, 0, 0] = 0.3                              # the same error at one pixel of each
    loss, plain = PhotoLogMSELoss(), MSELoss()
    loss.forward(pred, target)
    plain.forward(pred, target)
    weighted, even = loss.backward()[:, 0, 0, 0], plain.backward()[:, 0, 0, 0]
    assert even[0] == even[1]
    assert weighted[0] > 10 * weighted[1] > 0


def naive_bce(logits: np.ndarray, target) -> float:
    """The textbook formula, -y log p - (1 - y) log(1 - p) with p = sigmoid(z): fine for moderate z."""
    p = 1 / (1 + np.exp(-logits))
    return float(np.mean(-target * np.log(p) - (1 - target) * np.log(1 - p)))


@pytest.mark.parametrize("shape", [(2, 3, 5, 1), (1, 1, 1, 1), (3, 2, 2, 1)])
@pytest.mark.parametrize("target", ["ones", "zeros", "soft", "per_image"])
def test_bce_with_logits_value_and_gradient(shape, target, rng):
    logits = 3 * rng.standard_normal(shape)
    y = {"ones": 1.0, "zeros": 0.0, "soft": rng.uniform(0, 1, shape),
         "per_image": (np.arange(shape[0]) % 2).astype(np.float64).reshape(-1, 1, 1, 1)}[target]
    loss = BCEWithLogitsLoss()
    assert loss.forward(logits, y) == pytest.approx(naive_bce(logits, y), rel=1e-12)
    dlogits = loss.backward()
    assert dlogits.shape == logits.shape
    numeric = numeric_gradient(lambda: BCEWithLogitsLoss().forward(logits, y), logits)
    assert relative_error(dlogits, numeric) < GRAD_TOL


def test_bce_with_logits_is_stable_for_huge_logits():
    """+-1000 overflows exp in the naive formula; here: finite, the exact limits, no overflow."""
    logits = np.array([[-1000.0, -40.0, 40.0, 1000.0]]).reshape(1, 1, 4, 1)
    loss = BCEWithLogitsLoss()
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is the right answer
        right = loss.forward(logits, np.array([0.0, 0.0, 1.0, 1.0]).reshape(1, 1, 4, 1))
        assert right == pytest.approx(np.exp(-40) / 2, rel=1e-6)  # the two +-1000 terms are exactly 0
        np.testing.assert_allclose(loss.backward().ravel(), [0, np.exp(-40) / 4, -np.exp(-40) / 4, 0], atol=1e-30)
        wrong = loss.forward(logits, 1.0)  # every pair called real
        assert wrong == pytest.approx((1000 + 40 + 0 + 0) / 4, rel=1e-12)
        np.testing.assert_allclose(loss.backward().ravel(), [-0.25, -0.25, 0, 0], atol=1e-17)
    assert BCEWithLogitsLoss().forward(np.zeros((2, 2, 2, 1)), 1.0) == pytest.approx(np.log(2), rel=1e-15)


def test_bce_with_logits_keeps_float32(rng):
    logits = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    loss = BCEWithLogitsLoss()
    loss.forward(logits, 1.0)
    assert loss.backward().dtype == np.float32


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
    (lambda: BatchNorm2d(2, dtype=np.float64), (2, 5, 3, 2)),
    (lambda: Conv2d(2, 3, 4, dtype=np.float64, stride=2, padding=1), (2, 5, 3, 2)),
    (LeakyReLU, (2, 5, 3, 2)),
    (GlobalAvgPool2d, (2, 5, 3, 2)),
    (lambda: Linear(3, 4, dtype=np.float64), (5, 3)),
], ids=["conv", "maxpool", "upsample", "relu", "tanh", "batchnorm", "strided_conv", "leaky_relu", "avg_pool", "linear"])
def test_backward_does_not_modify_dout(make_layer, shape, rng):
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

@pytest.mark.parametrize("arch", ["seed", "unet"])
@pytest.mark.parametrize("widths,kernel,shape", [
    ((3, 4), 3, (2, 4, 6, 1)),      # one pool/upsample level, non-square
    ((2, 3, 4), 3, (2, 4, 8, 1)),   # two levels
    ((2, 3), 3, (1, 6, 2, 1)),      # batch 1, odd sizes after the pool
    ((3,), 5, (2, 3, 5, 1)),        # no pooling: odd sizes, 5x5 kernels
])
def test_colornet_end_to_end_gradients(arch, widths, kernel, shape, rng):
    """d MSE / d every parameter of a tiny float64 ColorNet in training mode, by the textbook's
    backprop vs central differences: the seed autoencoder, and the U-Net (BatchNorm with the
    batch's statistics, skips joined by Concat)."""
    model = ColorNet(widths, kernel=kernel, seed=3, dtype=np.float64, arch=arch).train()
    for layer in model.param_layers:  # non-zero biases and BatchNorm shifts: their gradients are exercised too
        if "b" in layer.params:
            layer.params["b"] = rng.standard_normal(layer.params["b"].shape) * 0.1
        if isinstance(layer, BatchNorm2d):
            layer.params["gamma"] = rng.uniform(0.5, 1.5, layer.params["gamma"].shape)
            layer.params["beta"] = rng.standard_normal(layer.params["beta"].shape) * 0.1
    lightness = rng.uniform(-1, 1, shape)
    ab_true = rng.uniform(-0.5, 0.5, shape[:3] + (2,))
    loss = MSELoss()
    f = lambda: MSELoss().forward(model.forward(lightness), ab_true)

    ab_pred = model.forward(lightness)
    assert ab_pred.shape == shape[:3] + (2,) and ab_pred.dtype == np.float64
    loss.forward(ab_pred, ab_true)
    model.backward(loss.backward())
    analytic = [{name: np.array(g, copy=True) for name, g in layer.grads.items()} for layer in model.param_layers]

    blocks = 2 * len(widths) - 1  # encoder levels, bottleneck, decoder levels; then the head's conv
    assert len(analytic) == (blocks + 1 if arch == "seed" else 2 * blocks + 1)
    checked = 0
    for i, layer in enumerate(model.param_layers):
        for name, p in layer.params.items():
            err = relative_error(analytic[i][name], numeric_gradient(f, p))
            assert err < GRAD_TOL, f"layer {i} {type(layer).__name__} d{name}: relative error {err:.2e}"
            checked += p.size
    assert checked == model.num_params()


def test_colornet_backward_needs_training_mode(rng):
    model = ColorNet((2, 3), seed=1, dtype=np.float64, arch="unet")  # eval mode by default
    out = model.forward(rng.uniform(-1, 1, (1, 4, 4, 1)))
    with pytest.raises(RuntimeError, match="training mode"):
        model.backward(out)
