"""The conv of a nearest-upsampled map at the low resolution (nanocolor/fast/upsampled.py) and the
network blocks that use it (fast.upsampled_block_forward / _backward): against the textbook
Upsample2d + Conv2d in float64, a gradient check, and whole networks (with their Concat and
BatchNorm) in training and inference."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import fast
from nanocolor.fast import gemm, norm, upsampled, winograd4
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import BatchNorm2d, Upsample2d
from nanocolor.model import ColorNet

# (low-resolution x shape, output channels): odd and one-pixel sizes; channels-first (F < 8) and
# channels-last products; batches that split into several pieces
CASES = [((2, 3, 5, 4), 3), ((1, 1, 1, 2), 2), ((3, 4, 2, 5), 9), ((1, 2, 7, 3), 8), ((40, 2, 3, 2), 16)]


def textbook(x, conv):
    """conv(upsample2x(x)) and its backward by the textbook layers, for a random dout:
    (out, dout, dx, dW)."""
    with fast.use_engine("im2col"):
        up = Upsample2d()
        out = conv.forward(up.forward(x))
        dout = np.random.default_rng(7).standard_normal(out.shape)
        dx = up.backward(conv.backward(dout))
    return out, dout, dx, conv.grads["W"]


@pytest.mark.parametrize("shape,c_out", CASES)
def test_conv_of_upsampled_map_matches_textbook(shape, c_out, workers, rng):
    x = rng.standard_normal(shape)
    conv = make_conv(shape[-1], c_out)
    w, b = conv.params["W"], conv.params["b"]
    expected, dout, dx_expected, dw_expected = textbook(x, conv)
    out = np.empty_like(expected)
    upsampled.add_forward(x, w, out, b=b)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    start = rng.standard_normal(expected.shape)  # without b it adds into what out holds
    added = start.copy()
    upsampled.add_forward(x, w, added)
    np.testing.assert_allclose(added - start, expected - b, rtol=1e-12, atol=1e-12)
    upsampled.add_forward(x, w, out, b=b, relu=True)
    assert (expected < 0).any()
    np.testing.assert_allclose(out, np.maximum(expected, 0), rtol=1e-12, atol=1e-12)
    dx, dw = upsampled.backward(dout.copy(), x, w)
    np.testing.assert_allclose(dx, dx_expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_expected, rtol=1e-12, atol=1e-12)


def test_gradients_by_central_differences(rng):
    """d sum(out * dout) / dx and / dW, numerically, for a small odd-sized case."""
    x, w = rng.standard_normal((2, 3, 2, 3)), rng.standard_normal((3, 3, 3, 4))
    dout = rng.standard_normal((2, 6, 4, 4))

    def f() -> float:
        out = np.zeros(dout.shape)
        upsampled.add_forward(x, w, out)
        return float(np.sum(out * dout))

    dx, dw = upsampled.backward(dout, x, w)
    assert relative_error(dx, numeric_gradient(f, x)) < 1e-8
    assert relative_error(dw, numeric_gradient(f, w)) < 1e-8


def test_combined_weights_adjoint_is_the_transpose(rng):
    """<combined_weights(w), g> = <w, adjoint(g)> for random w and g."""
    w, g = rng.standard_normal((3, 3, 5, 4)), rng.standard_normal((5, 16 * 4))
    lhs = np.sum(upsampled.combined_weights(w) * g)
    rhs = np.sum(w * upsampled.combined_weights_adjoint(g, 4))
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)


def running_blocks(monkeypatch) -> list:
    """Record whether each call of fast.upsampled_block_forward took the block (True) or not."""
    ran, original = [], norm.upsampled_block_forward

    def recording(*args):
        out = original(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(fast, "upsampled_block_forward", recording)
    return ran


def with_statistics(model: ColorNet, seed: int = 3) -> ColorNet:
    """BatchNorm layers whose scale, shift and running statistics are not the identity."""
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            C = layer.params["gamma"].size
            layer.params["gamma"], layer.params["beta"] = r.uniform(0.5, 1.5, C), r.standard_normal(C)
            layer.buffers["running_mean"], layer.buffers["running_var"] = r.standard_normal(C), r.uniform(0.5, 2, C)
    return model


@pytest.mark.parametrize("arch,widths", [("seed", (4, 16, 16)), ("unet", (8, 16, 32)), ("unet", (32, 16))])
def test_network_training_step_matches_textbook(arch, widths, workers, rng, monkeypatch):
    """Every block after an upsampling runs at the low resolution in training (its backward too),
    and output, gradients and BatchNorm statistics are the textbook network's."""
    lightness = rng.uniform(-1, 1, (3, 8, 12, 1))
    d_ab = rng.standard_normal((3, 8, 12, 2))
    ran = running_blocks(monkeypatch)
    results = []
    for engine in ("im2col", "auto"):
        model = with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64)).train()
        with fast.use_engine(engine):
            ab = model.forward(lightness)
            model.backward(d_ab)
        results.append((ab, [layer.grads[k].copy() for layer in model.param_layers for k in layer.params],
                        [layer.buffers["running_var"].copy() for layer in model.layers if isinstance(layer, BatchNorm2d)]))
    assert ran == [False] * (len(widths) - 1) + [True] * (len(widths) - 1)  # none under the textbook engine
    assert all(block[0].cache[0] == "upsampled" for block, _, _ in model.up[1:]) and model.head[0].cache[0] == "upsampled"
    (ab_ref, grads_ref, stats_ref), (ab, grads, stats) = results
    np.testing.assert_allclose(ab, ab_ref, rtol=1e-12, atol=1e-13)
    for got, expected in zip(grads + stats, grads_ref + stats_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["gemm", "winograd"])
def test_other_engines_train_on_the_upsampled_map(engine, rng, monkeypatch):
    """The "gemm" and "winograd" engines mean every conv by that path: no block at low resolution."""
    ran = running_blocks(monkeypatch)
    model = ColorNet((4, 16, 16), arch="unet", seed=2, dtype=np.float64).train()
    with fast.use_engine(engine):
        model.backward(model.forward(rng.uniform(-1, 1, (2, 8, 8, 1))))
    assert ran and not any(ran)


@pytest.mark.parametrize("arch,widths", [("seed", (8, 16, 32)), ("unet", (8, 16, 32)), ("unet", (32, 64))])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_network_inference_matches_textbook(arch, widths, dtype, tol, workers, rng, monkeypatch):
    """In eval mode too (BatchNorm folded into the conv, the ReLU in its last pass); the head after
    a Concat multiplies first and takes the upsampled products at the low resolution."""
    model = with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64))
    for layer in model.param_layers:
        for store in (layer.params, getattr(layer, "buffers", {})):
            for name in store:
                store[name] = store[name].astype(dtype)
    lightness = rng.uniform(-1, 1, (2, 8, 12, 1)).astype(dtype)
    with fast.use_engine("im2col"):
        expected = model.forward(lightness)
    ran = running_blocks(monkeypatch)
    heads, original = [], gemm.multiply_then_shift
    monkeypatch.setattr(gemm, "multiply_then_shift", lambda *a, **k: heads.append(k.get("upsampled") is not None) or original(*a, **k))
    got = model.forward(lightness)
    assert ran == [True] * (len(widths) - 1)
    assert (True in heads) == (arch == "unet")
    assert all(layer.cache is None for layer in model.layers if type(layer).__name__ == "Conv2d")  # none kept
    assert got.dtype == dtype
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_unet_decoder_conv_as_one_winograd_conv(dtype, tol, use_workers, rng, monkeypatch):
    """A U-Net decoder block whose skip conv Winograd F(4x4) takes (channels >= 16, sizes that
    divide by 4) runs as one F(4x4) conv of the joined input (winograd4.forward's `upsampled`):
    a training step (output, every gradient, BatchNorm statistics) and inference match the textbook."""
    use_workers(2)  # the "auto" engine takes Winograd where BLAS runs one thread per call
    joined, original = [], winograd4.forward
    monkeypatch.setattr(winograd4, "forward", lambda *a, **k: joined.append(k.get("upsampled") is not None) or original(*a, **k))
    lightness = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(dtype)
    d_ab = rng.standard_normal((2, 16, 16, 2)).astype(dtype)
    results = []
    for engine in ("im2col", "auto"):
        model = with_statistics(ColorNet((16, 16, 16), arch="unet", seed=2, dtype=np.float64))
        for layer in model.param_layers:
            for store in (layer.params, getattr(layer, "buffers", {})):
                for name in store:
                    store[name] = store[name].astype(dtype)
        with fast.use_engine(engine):
            inferred = model.forward(lightness)
            model.train()
            ab = model.forward(lightness)
            model.backward(d_ab)
        results.append((inferred, ab, [layer.grads[k].copy() for layer in model.param_layers for k in layer.params],
                        [layer.buffers["running_var"].copy() for layer in model.layers if isinstance(layer, BatchNorm2d)]))
    assert joined.count(True) == 2  # the 8x8 block (16 upsampled + 16 skip channels), in eval and in training
    (inf_ref, ab_ref, grads_ref, stats_ref), (inf, ab, grads, stats) = results
    for got, expected in zip([inf, ab] + grads + stats, [inf_ref, ab_ref] + grads_ref + stats_ref):
        assert got.dtype == dtype
        assert np.linalg.norm(got - expected) <= tol * np.linalg.norm(expected)
