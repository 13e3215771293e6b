"""Winograd F(2x2, 3x3) (nanocolor/fast/winograd.py): transforms against their definitions and
adjoints, the Winograd path of fast.conv2d_forward / _backward against the textbook Conv2d (im2col),
and which path fast.conv2d_path picks for each --conv choice."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import engine, fast
from nanocolor.fast import parallel, winograd
from nanocolor.model import ColorNet

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
# Conv2d on the Winograd path (gradients by central differences: tests/test_layers.py)

def textbook_and_winograd(conv_args: tuple, x, dout, input_grad: bool = True, dtype=np.float64) -> tuple:
    """(out, dx, grads) of the float64 textbook Conv2d and of fast.conv2d_forward / _backward by
    the Winograd path in `dtype`, from the same seeded weights and data."""
    conv = make_conv(*conv_args, dtype=np.float64)
    conv.input_grad = input_grad
    out = conv.forward(x)
    dx = conv.backward(dout)
    textbook = (out, dx, dict(conv.grads))
    conv = make_conv(*conv_args, dtype=dtype)
    w, b = conv.params["W"], conv.params["b"]
    out_fast, cache = fast.conv2d_forward(x.astype(dtype), w, b, "winograd")
    assert cache[0] == "winograd"
    dx_fast, dw, db = fast.conv2d_backward(dout.astype(dtype), w, cache, input_grad)
    return textbook, (out_fast, dx_fast, {"W": dw, "b": db})


@pytest.mark.parametrize("shape,c_out", [((3, 8, 6, 5), 7), ((1, 2, 10, 2), 3), ((2, 4, 4, 16), 8),
                                         ((1, 12, 6, 3), 2)])  # batch 1: forward in bands of tile rows
def test_winograd_conv_matches_im2col_reference(shape, c_out, workers, rng):
    """Forward, dx, dW and db equal the textbook path's (float64, to rounding)."""
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    (out, dx, grads), (out_fast, dx_fast, grads_fast) = textbook_and_winograd((shape[-1], c_out, 3), x, dout)
    np.testing.assert_allclose(out_fast, out, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(dx_fast, dx, rtol=1e-11, atol=1e-11)
    for name in ("W", "b"):
        np.testing.assert_allclose(grads_fast[name], grads[name], rtol=1e-11, atol=1e-11)


def test_winograd_conv_float32_close_to_float64_reference(rng):
    x, dout = rng.standard_normal((2, 8, 6, 16)), rng.standard_normal((2, 8, 6, 24))
    (out, dx, grads), (out32, dx32, grads32) = textbook_and_winograd((16, 24, 3), x, dout, dtype=np.float32)
    assert out32.dtype == dx32.dtype == grads32["W"].dtype == np.float32
    np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx32, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads32["W"], grads["W"], rtol=1e-4, atol=1e-3)


def test_winograd_conv_without_input_grad_still_fills_weight_grads(rng):
    x, dout = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, 4, 4, 4))
    (_, dx, grads), (_, dx_fast, grads_fast) = textbook_and_winograd((3, 4, 3), x, dout, input_grad=False)
    assert dx is None and dx_fast is None
    np.testing.assert_allclose(grads_fast["W"], grads["W"], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(grads_fast["b"], grads["b"], rtol=1e-11, atol=1e-11)


def path(conv: str, c_in: int, c_out: int, k: int = 3, H: int = 8, W: int = 8, x=None) -> str:
    return fast.conv2d_path(x if x is not None else np.zeros((1, H, W, c_in)), np.zeros((k, k, c_in, c_out)), conv)


def test_conv_choice_and_fallback(monkeypatch):
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    assert path("winograd", 32, 32) == "winograd"
    assert path("winograd", 32, 32, H=7) == "gemm"      # odd height: no tiling
    assert path("winograd", 1, 32) == "winograd"        # asked for, even if thin
    assert path("winograd", 4, 4, k=5) == "gemm"        # only 3x3 kernels
    assert path("winograd4", 32, 32) == "winograd4"
    assert path("winograd4", 1, 32) == "winograd4"      # asked for, even if thin
    assert path("winograd4", 32, 32, H=6) == "gemm"     # F(4x4) tiles only sizes that divide by 4
    assert path("winograd4", 4, 4, k=5) == "gemm"
    assert path("gemm", 32, 32) == "gemm"
    assert path("auto", 32, 32) == "winograd4"          # sizes that divide by 4: F(4x4, 3x3)
    assert path("auto", 128, 32) == "winograd4"         # few outputs too: as fast as multiplying first
    assert path("auto", 32, 32, H=6) == "winograd"      # even sizes: F(2x2, 3x3)
    assert path("auto", 1, 32) == "gemm"                # too thin to pay off
    assert path("auto", 16, 16, H=6) == "winograd" and path("auto", 15, 32) == "gemm"
    assert path("auto", 128, 32, H=6) == "gemm" and path("auto", 128, 33, H=6) == "winograd"  # few outputs: multiply first
    assert path("auto", 32, 32, x=OffHost((1, 8, 8, 32))) == "gemm"  # not on the CPU
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: False)
    assert path("auto", 32, 32) == "gemm"               # 16 or 36 multi-threaded BLAS calls: no
    assert path("winograd", 32, 32) == "winograd" and path("winograd4", 32, 32) == "winograd4"  # asked for


@pytest.mark.parametrize("single", [True, False])
def test_gemm_never_takes_winograd(single, monkeypatch):
    """--conv gemm means every conv by gemm.py, whatever its shape."""
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: single)
    for k in (1, 3, 5):
        for H, W in ((4, 4), (8, 8), (6, 10), (16, 12), (5, 7), (2, 2)):
            for c_in, c_out in ((1, 8), (16, 16), (32, 32), (128, 32), (64, 512)):
                assert path("gemm", c_in, c_out, k=k, H=H, W=W) == "gemm"


def test_im2col_is_no_fast_conv():
    """The textbook's im2col is picked by nanocolor.engine (it runs the model itself), not by the fast engine."""
    with pytest.raises(ValueError, match="conv must be one of"):
        path("im2col", 32, 32)
    model = ColorNet((4, 8), seed=0, arch="seed")
    with engine.use_conv("im2col"):
        assert engine.network(model) is model
    for conv in fast.CONVS:
        with engine.use_conv(conv):
            runner = engine.network(model)
        assert isinstance(runner, fast.Network) and runner.conv == conv


class OffHost:
    """Stands for a device array: it has a shape but is no NumPy array."""

    def __init__(self, shape: tuple):
        self.shape = shape


def test_winograd_odd_size_falls_back(rng):
    conv = make_conv(2, 3, 3)
    x = rng.standard_normal((1, 5, 4, 2))
    path_taken = fast.conv2d_path(x, conv.params["W"], "winograd")
    assert path_taken == "gemm"
    out, cache = fast.conv2d_forward(x, conv.params["W"], conv.params["b"], path_taken)
    assert cache[0] == "gemm" and out.shape == (1, 5, 4, 3)
    np.testing.assert_allclose(out, conv.forward(x), rtol=1e-12, atol=1e-12)
