"""Winograd F(4x4, 3x3) (nanocolor/fast/winograd4.py) against the float64 im2col reference:
forward and backward exact up to rounding in float64, and its larger float32 rounding error
measured."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import fast
from nanocolor.fast import parallel, upsampled, winograd4
from nanocolor.layers import Concat, Upsample2d

CASES = [((2, 8, 12, 3), 5), ((1, 4, 4, 2), 2), ((3, 16, 8, 16), 24), ((1, 12, 20, 7), 3), ((5, 4, 8, 1), 4)]


def reference(x, conv):
    """The textbook Conv2d's output (im2col + one GEMM)."""
    return conv.forward(x)


@pytest.mark.parametrize("shape,c_out", CASES)
def test_float64_equals_im2col(shape, c_out, workers, rng):
    conv = make_conv(shape[-1], c_out, 3)
    x = rng.standard_normal(shape)
    expected = reference(x, conv)
    got, cache = winograd4.forward(x, conv.params["W"], conv.params["b"])
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_array_equal(winograd4.forward(x, conv.params["W"], conv.params["b"], relu=True)[0],
                                  np.maximum(got, 0))
    assert cache[0] == "winograd4" and cache[1] == x.shape and cache[3] is x and cache[4] is None  # keeps x, not V
    np.testing.assert_array_equal(cache[2], winograd4.filter_transform(conv.params["W"]))


@pytest.mark.parametrize("shape,c_out", [((2, 32, 32, 64), 32), ((4, 8, 8, 128), 256)])
def test_float32_error_against_the_float64_reference(shape, c_out, use_workers, rng):
    """The transforms scale by up to ~100: F(4x4, 3x3) rounds some 5x more than F(2x2, 3x3), still
    ~1e-6 of the output's size, far below a level of 8-bit color."""
    use_workers(2)
    conv = make_conv(shape[-1], c_out, 3)
    conv.params["W"] /= np.sqrt(9 * shape[-1])  # He-like scale: outputs of order 1
    x = rng.standard_normal(shape)
    expected = reference(x, conv)
    got, _ = winograd4.forward(x.astype(np.float32), conv.params["W"].astype(np.float32),
                               conv.params["b"].astype(np.float32))
    assert got.dtype == np.float32
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    assert np.abs(got - expected).max() < 2e-4


@pytest.mark.parametrize("c_in,c_out", [(3, 5), (64, 512)])  # one piece, and one per worker
def test_filter_transform_is_g_w_g_transposed(c_in, c_out, use_workers, rng):
    use_workers(2)
    w = rng.standard_normal((3, 3, c_in, c_out))
    expected = np.einsum("ai,ijcf,bj->abcf", winograd4.G, w, winograd4.G).reshape(36, c_in, c_out)
    np.testing.assert_allclose(winograd4.filter_transform(w), expected, rtol=1e-13, atol=1e-13)


def test_same_result_with_one_worker_or_several(use_workers, rng):
    conv = make_conv(8, 16, 3)
    x = rng.standard_normal((3, 16, 12, 8))
    results = []
    for threads in (1, 3):
        use_workers(threads)
        results.append(winograd4.forward(x, conv.params["W"], conv.params["b"])[0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape,c_out", CASES)
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("keep_v", [True, False])  # V kept by the forward, or computed again from x
def test_backward_float64_equals_im2col(shape, c_out, input_grad, keep_v, workers, rng):
    conv = make_conv(shape[-1], c_out, 3)
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    conv.forward(x)  # the textbook layer
    dx_expected = conv.backward(dout)
    dw_expected, db_expected = conv.grads["W"], conv.grads["b"]
    _, cache = winograd4.forward(x, conv.params["W"], conv.params["b"], keep_v=keep_v)
    assert (cache[4] is not None) == keep_v and (cache[3] is None) == keep_v  # V or x, never both
    dx, dw, db = winograd4.backward(dout, cache, input_grad)
    np.testing.assert_allclose(dw, dw_expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(db, db_expected, rtol=1e-11, atol=1e-11)
    if input_grad:
        np.testing.assert_allclose(dx, dx_expected, rtol=1e-11, atol=1e-11)
    else:
        assert dx is None


@pytest.mark.parametrize("C, F", [(4, 5), (33, 1000)], ids=["small", "split-by-channel"])
def test_filter_transform_adjoint_is_the_adjoint(C, F, use_workers, rng):
    """<filter_transform(w), dU> = <w, filter_transform_adjoint(dU)> for any w and dU, on one worker
    and (filters big enough to be split by input channel) on several; partial sums (S, 36, C, F)
    give the adjoint of their sum."""
    w, partials = rng.standard_normal((3, 3, C, F)), rng.standard_normal((2, 36, C, F))
    dU = partials.sum(axis=0)
    for workers in (1, 3):
        use_workers(workers)
        dw = winograd4.filter_transform_adjoint(dU)
        assert np.isclose(np.sum(winograd4.filter_transform(w) * dU), np.sum(w * dw), rtol=1e-12)
        np.testing.assert_allclose(winograd4.filter_transform_adjoint(partials), dw, rtol=1e-12, atol=1e-12)


def test_float32_gradient_error_against_the_float64_reference(use_workers, rng):
    use_workers(2)
    shape, c_out = (4, 16, 16, 64), 32
    conv = make_conv(shape[-1], c_out, 3)
    conv.params["W"] /= np.sqrt(9 * shape[-1])
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    conv.forward(x)  # the textbook layer
    dx_expected = conv.backward(dout)
    dw_expected = conv.grads["W"]
    U = winograd4.filter_transform(conv.params["W"].astype(np.float32))
    dx, dw, _ = winograd4.backward(dout.astype(np.float32), ("winograd4", x.shape, U, x.astype(np.float32), None))
    assert dx.dtype == dw.dtype == np.float32
    for got, expected in ((dx, dx_expected), (dw, dw_expected)):
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_the_seam_keeps_v_for_training_only(rng):
    x, w, b = rng.standard_normal((2, 8, 8, 16)), rng.standard_normal((3, 3, 16, 16)), np.zeros(16)
    _, training_cache = fast.conv2d_forward(x, w, b, "winograd4")
    _, inference_cache = fast.conv2d_forward(x, w, b, "winograd4", inference=True)
    assert training_cache[4].shape == (6, 6, 2 * 2 * 2, 16)  # 36 positions x 8 tiles x 16 channels
    assert inference_cache[4] is None  # no backward follows: V stays in scratch


# (skip shape, upsampled channels, output channels): one-tile and non-square images, one channel,
# batches that split into several pieces
JOINED_CASES = [((2, 8, 12, 3), 4, 5), ((1, 4, 4, 2), 1, 2), ((3, 16, 8, 5), 6, 7), ((9, 4, 8, 2), 3, 4)]


@pytest.mark.parametrize("keep_v", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("shape,c_up,c_out", JOINED_CASES)
def test_upsampled_input_float64_equals_im2col(shape, c_up, c_out, keep_v, workers, rng):
    """forward(skip, w, b, upsampled=x_low) = the conv of concat(upsample2x(x_low), skip); backward
    of its cache gives the skip channels' gradients, and with upsampled.backward for x_low's
    channels the textbook's gradients of the joined conv."""
    N, H, W, C = shape
    skip, x_low = rng.standard_normal(shape), rng.standard_normal((N, H // 2, W // 2, c_up))
    conv = make_conv(c_up + C, c_out, 3)
    dout = rng.standard_normal((N, H, W, c_out))
    up, cat = Upsample2d(), Concat()  # the textbook layers
    expected = conv.forward(cat.forward(up.forward(x_low), skip))
    d_up, dskip_expected = cat.backward(conv.backward(dout))
    dx_low_expected = up.backward(d_up)
    w, b = conv.params["W"], conv.params["b"]
    out, cache = winograd4.forward(skip, w, b, keep_v=keep_v, upsampled=x_low)
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_array_equal(winograd4.forward(skip, w, b, relu=True, upsampled=x_low)[0], np.maximum(out, 0))
    dskip, dw_skip, db = winograd4.backward(dout, cache)
    dx_low, dw_low = upsampled.backward(dout, x_low, w[:, :, :c_up])
    for got, want in ((dskip, dskip_expected), (dx_low, dx_low_expected), (db, conv.grads["b"]),
                      (np.concatenate([dw_low, dw_skip], axis=2), conv.grads["W"])):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)
