"""Winograd F(2x2, 3x3): transforms against their definitions and adjoints, the Winograd Conv2d
against central differences (float64) and against the im2col reference path."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import check_gradients, make_conv
from nanocolor import parallel, winograd
from nanocolor.layers import Conv2d

def tiles_of(x_pad: np.ndarray) -> np.ndarray:
    """(N, 2th+2, 2tw+2, C) -> every 4x4 tile at stride 2, (N, th, tw, 4, 4, C), by loops."""
    N, Hp, Wp, C = x_pad.shape
    th, tw = (Hp - 2) // 2, (Wp - 2) // 2
    out = np.empty((N, th, tw, 4, 4, C))
    for t in range(th):
        for u in range(tw):
            out[:, t, u] = x_pad[:, 2 * t:2 * t + 4, 2 * u:2 * u + 4]
    return out


# ---------------------------------------------------------------------------------------------
# Transforms

def test_matrices_compute_a_1d_correlation(rng):
    """A^T [(G g) * (B^T d)] is the 'valid' correlation of a 4-sample signal with a 3-tap kernel."""
    d, g = rng.standard_normal(4), rng.standard_normal(3)
    expected = np.array([d[0:3] @ g, d[1:4] @ g])
    np.testing.assert_allclose(winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d)), expected, rtol=1e-13)


@pytest.mark.parametrize("rows", [None, slice(0, 2), slice(2, 4), slice(0, 4)])
def test_pad_and_split_matches_zero_padding(rows, rng):
    x = rng.standard_normal((2, 4, 6, 3))
    x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    if rows is not None:  # a band of rows with one row of context (or zeros) each side
        x_pad = x_pad[:, rows.start:rows.stop + 2]
    split = winograd.pad_and_split(x, rows, out=np.full(x_pad.shape[:2] + (2, 4, 3), np.nan))
    np.testing.assert_array_equal(split[:, :, 0], x_pad[:, :, 0::2])
    np.testing.assert_array_equal(split[:, :, 1], x_pad[:, :, 1::2])


def test_input_and_filter_transforms_match_definitions(rng):
    x = rng.standard_normal((2, 4, 6, 3))
    x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = rng.standard_normal((3, 3, 3, 4))
    V = winograd.input_transform(winograd.pad_and_split(x))
    expected_V = np.einsum("ai,ntuijc,bj->abntuc", winograd.B_T, tiles_of(x_pad), winograd.B_T)
    np.testing.assert_allclose(V, expected_V.reshape(16, -1, 3), rtol=1e-12, atol=1e-12)
    U = winograd.filter_transform(w)
    expected_U = np.einsum("ai,ijcf,bj->abcf", winograd.G, w, winograd.G)
    np.testing.assert_allclose(U, expected_U.reshape(16, 3, 4), rtol=1e-12, atol=1e-12)


def test_output_transform_matches_definition(rng):
    N, th, tw, F = 2, 2, 3, 4
    M = rng.standard_normal((16, N * th * tw, F))
    y = winograd.output_transform(M, (N, th, tw))
    tiles = np.einsum("ra,abntuf,qb->ntrquf", winograd.A_T, M.reshape(4, 4, N, th, tw, F), winograd.A_T)
    expected = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(N, 2 * th, 2 * tw, F)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,th,tw,C", [(2, 3, 2, 3), (1, 1, 1, 1), (1, 2, 4, 2)])
def test_adjoints_satisfy_dot_product_identity(N, th, tw, C, rng):
    """<T x, y> == <x, T* y> for each transform T and the adjoint used in backward."""
    x = rng.standard_normal((N, 2 * th, 2 * tw, C))
    dV = rng.standard_normal((16, N * th * tw, C))
    dx = winograd.input_transform_adjoint(dV, (N, th, tw))
    assert dx.shape == x.shape
    assert np.sum(winograd.input_transform(winograd.pad_and_split(x)) * dV) == pytest.approx(np.sum(x * dx), rel=1e-12)

    M = rng.standard_normal((16, N * th * tw, C))
    dy = rng.standard_normal((N, 2 * th, 2 * tw, C))
    dM = winograd.output_transform_adjoint(dy)
    assert np.sum(winograd.output_transform(M, (N, th, tw)) * dy) == pytest.approx(np.sum(M * dM), rel=1e-12)

    w, dU = rng.standard_normal((3, 3, C, 2)), rng.standard_normal((16, C, 2))
    dw = winograd.filter_transform_adjoint(dU)
    assert np.sum(winograd.filter_transform(w) * dU) == pytest.approx(np.sum(w * dw), rel=1e-12)


def test_applies_only_to_3x3_on_even_sizes():
    assert winograd.applies(3, 4, 6) and winograd.applies(3, 2, 2)
    assert not winograd.applies(3, 5, 6) and not winograd.applies(3, 4, 7)
    assert not winograd.applies(5, 4, 4) and not winograd.applies(1, 4, 4)


# ---------------------------------------------------------------------------------------------
# Conv2d on the Winograd path

@pytest.mark.parametrize("shape,c_out", [
    ((2, 4, 6, 3), 4),   # non-square
    ((1, 2, 2, 1), 2),   # batch 1, a single tile, one input channel
    ((1, 6, 4, 5), 1),   # one output channel
])
def test_winograd_conv_gradients(shape, c_out, rng):
    conv = make_conv(shape[-1], c_out, 3, "winograd")
    check_gradients(conv, rng.standard_normal(shape), rng)
    assert conv.cache[0] == "winograd"


@pytest.mark.parametrize("shape,c_out", [((3, 8, 6, 5), 7), ((1, 2, 10, 2), 3), ((2, 4, 4, 16), 8),
                                         ((1, 12, 6, 3), 2)])  # batch 1: forward in bands of tile rows
def test_winograd_conv_matches_im2col_reference(shape, c_out, workers, rng):
    """Forward, dx, dW and db equal the textbook path's (float64, to rounding)."""
    fast, ref = make_conv(shape[-1], c_out, 3, "winograd"), make_conv(shape[-1], c_out, 3, "im2col")
    ref.dx_method = "col2im"
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape[:3] + (c_out,))
    np.testing.assert_allclose(fast.forward(x), ref.forward(x), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(fast.backward(dout), ref.backward(dout), rtol=1e-11, atol=1e-11)
    for name in ("W", "b"):
        np.testing.assert_allclose(fast.grads[name], ref.grads[name], rtol=1e-11, atol=1e-11)
    assert fast.cache[0] == "winograd" and ref.cache[0] == "im2col"


def test_winograd_conv_float32_close_to_float64_reference(rng):
    fast = make_conv(16, 24, 3, "winograd", dtype=np.float32)
    ref = make_conv(16, 24, 3, "im2col", dtype=np.float64)
    ref.params = {name: p.astype(np.float64) for name, p in fast.params.items()}
    x = rng.standard_normal((2, 8, 6, 16))
    dout = rng.standard_normal((2, 8, 6, 24))
    out = fast.forward(x.astype(np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref.forward(x), rtol=1e-4, atol=1e-4)
    dx = fast.backward(dout.astype(np.float32))
    assert dx.dtype == np.float32 and fast.grads["W"].dtype == np.float32
    np.testing.assert_allclose(dx, ref.backward(dout), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.grads["W"], ref.grads["W"], rtol=1e-4, atol=1e-3)


def test_winograd_conv_without_input_grad_still_fills_weight_grads(rng):
    fast, ref = make_conv(3, 4, 3, "winograd"), make_conv(3, 4, 3, "im2col")
    fast.input_grad = ref.input_grad = False
    x, dout = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, 4, 4, 4))
    fast.forward(x), ref.forward(x)
    assert fast.backward(dout) is None and ref.backward(dout) is None
    np.testing.assert_allclose(fast.grads["W"], ref.grads["W"], rtol=1e-11, atol=1e-11)


def test_method_choice_and_fallback(monkeypatch):
    assert make_conv(32, 32, 3, "winograd").path(8, 8) == "winograd"
    assert make_conv(32, 32, 3, "winograd").path(7, 8) == "gemm"     # odd height: no tiling
    assert make_conv(1, 32, 3, "winograd").path(8, 8) == "winograd"  # asked for, even if thin
    assert make_conv(32, 32, 3, "im2col").path(8, 8) == "im2col"
    five = Conv2d(4, 4, 5, rng=np.random.default_rng(0), dtype=np.float64)
    five.method = "winograd"
    assert five.path(8, 8) == "gemm"                             # only 3x3 kernels
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    assert make_conv(32, 32, 3, "auto").path(8, 8) == "winograd"
    assert make_conv(32, 32, 3, "auto").path(8, 8, on_cpu=False) == "gemm"
    assert make_conv(1, 32, 3, "auto").path(8, 8) == "gemm"         # too thin to pay off
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: False)
    assert make_conv(32, 32, 3, "auto").path(8, 8) == "gemm"        # 16 multi-threaded BLAS calls: no
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    monkeypatch.setattr(Conv2d, "auto_winograd", False)
    assert make_conv(32, 32, 3, "auto").path(8, 8) == "gemm"
    with pytest.raises(ValueError):
        make_conv(32, 32, 3, "winogard").path(8, 8)


def test_winograd_odd_size_falls_back(rng):
    conv = make_conv(2, 3, 3, "winograd")
    x = rng.standard_normal((1, 5, 4, 2))
    out = conv.forward(x)
    assert conv.cache[0] == "gemm" and out.shape == (1, 5, 4, 3)
