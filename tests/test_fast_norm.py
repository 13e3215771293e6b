"""The fast engine's BatchNorm2d, Concat and the U-Net's fused inference block (nanocolor/fast/norm.py)
against the textbook layers: training forward and backward in float64 with one worker and
several, float32 with a large mean (the statistics must not cancel), the conv's ReLU epilogue on
every path, and whole U-Nets in inference with BatchNorm folded into the convs."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import fast
from nanocolor.fast import norm, parallel
from nanocolor.layers import BatchNorm2d, Concat, Upsample2d
from nanocolor.model import ColorNet

SHAPES = [(2, 3, 5, 4), (1, 9, 4, 3), (5, 6, 4, 2), (1, 1, 1, 3), (3, 40, 24, 7)]


def batchnorm(channels: int, rng, dtype) -> BatchNorm2d:
    bn = BatchNorm2d(channels, dtype=dtype)
    bn.params["gamma"] = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bn.params["beta"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_mean"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_var"] = rng.uniform(0.5, 2, channels).astype(dtype)
    return bn


def both_engines(layer_factory, run) -> dict:
    """{engine: run(fresh layer)} for the textbook code and the fast engine, from equal layers."""
    results = {}
    for engine in ("im2col", "auto"):
        with fast.use_engine(engine):
            results[engine] = run(layer_factory())
    return results


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_training_matches_textbook(shape, workers, rng):
    x = rng.standard_normal(shape) * 3 + 1
    dout = rng.standard_normal(shape)
    seed = int(rng.integers(1 << 30))

    def run(bn):
        out = bn.forward(x)
        dx = bn.backward(dout)
        return out, dx, bn.grads["gamma"], bn.grads["beta"], bn.buffers["running_mean"], bn.buffers["running_var"]

    results = both_engines(lambda: batchnorm(shape[-1], np.random.default_rng(seed), np.float64), run)
    for textbook, fast_ in zip(results["im2col"], results["auto"]):
        np.testing.assert_allclose(fast_, textbook, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_batchnorm_inference_matches_textbook(shape, workers, rng):
    x = rng.standard_normal(shape)
    seed = int(rng.integers(1 << 30))

    def run(bn):
        bn.training = False
        return bn.forward(x)

    results = both_engines(lambda: batchnorm(shape[-1], np.random.default_rng(seed), np.float64), run)
    np.testing.assert_allclose(results["auto"], results["im2col"], rtol=1e-12, atol=1e-12)


def test_batchnorm_float32_statistics_survive_a_large_mean(use_workers, rng):
    """Variance from per-piece sums about each piece's own mean: no cancellation when the mean is
    a thousand standard deviations away from zero."""
    use_workers(2)
    shape = (4, 32, 32, 8)
    x64 = rng.standard_normal(shape) * 0.1 + 100
    dout64 = rng.standard_normal(shape)
    exact = batchnorm(8, np.random.default_rng(5), np.float64)
    with fast.use_engine("im2col"):
        out_exact, dx_exact = exact.forward(x64), exact.backward(dout64)
    bn = batchnorm(8, np.random.default_rng(5), np.float32)
    with fast.use_engine("auto"):
        out = bn.forward(x64.astype(np.float32))
        dx = bn.backward(dout64.astype(np.float32))
    assert bn.cache[0] == "fast"
    assert np.abs(out - out_exact).max() < 2e-3  # out is O(1): float32 x carries ~1e-5 of 100 / 0.1
    np.testing.assert_allclose(bn.buffers["running_var"], exact.buffers["running_var"], rtol=1e-3)
    assert np.linalg.norm(dx - dx_exact) / np.linalg.norm(dx_exact) < 1e-2


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 9, 4, 3)])
def test_concat_matches_textbook(shape, workers, rng):
    a, b = rng.standard_normal(shape), rng.standard_normal(shape[:-1] + (5,))
    dout = rng.standard_normal(shape[:-1] + (shape[-1] + 5,))
    results = both_engines(Concat, lambda cat: (cat.forward(a, b), *cat.backward(dout)))
    assert results["auto"][0].flags.c_contiguous  # backward hands out views of dout
    for textbook, fast_ in zip(results["im2col"], results["auto"]):
        np.testing.assert_array_equal(fast_, textbook)


@pytest.mark.parametrize("path,shape,c_out", [("gemm", (2, 6, 5, 3), 4), ("gemm", (2, 5, 4, 8), 2),
                                              ("winograd", (3, 6, 4, 3), 5)])
def test_relu_epilogue_equals_relu_of_the_conv(path, shape, c_out, workers, rng):
    conv = make_conv(shape[-1], c_out, 3, dtype=np.float64)
    conv.params["b"] = rng.standard_normal(c_out)
    x = rng.standard_normal(shape)
    plain, _ = fast.conv2d_forward(x, conv.params["W"], conv.params["b"], path)
    fused, _ = fast.conv2d_forward(x, conv.params["W"], conv.params["b"], path, relu=True)
    assert (plain < 0).any() and (plain > 0).any()
    np.testing.assert_array_equal(fused, np.maximum(plain, 0))


def unet_with_statistics(dtype, seed: int = 3) -> ColorNet:
    """A U-Net in inference mode whose BatchNorms are not the identity."""
    model = ColorNet((8, 16, 32), arch="unet", seed=seed, dtype=dtype)
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            fresh = batchnorm(layer.params["gamma"].size, r, dtype)
            layer.params, layer.buffers = fresh.params, fresh.buffers
    return model.eval()


@pytest.mark.parametrize("engine", ["auto", "gemm", "winograd"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_unet_inference_with_folded_batchnorm_matches_textbook(engine, dtype, tol, workers, monkeypatch):
    lightness = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1)).astype(dtype)
    model = unet_with_statistics(dtype)
    with fast.use_engine("im2col"):
        expected = model.forward(lightness)
    fused_blocks, paths = [], []
    original, original_path = norm.fused_block_forward, fast.conv2d_path

    def counting(layers, x, inference):
        out = original(layers, x, inference)
        fused_blocks.append(out is not None)
        return out

    def path(x, w):
        paths.append(original_path(x, w))
        return paths[-1]

    monkeypatch.setattr(fast, "fused_block_forward", counting)
    monkeypatch.setattr(fast, "conv2d_path", path)
    with fast.use_engine(engine):
        got = model.forward(lightness)
    # 2 down, the bottleneck, the first up; the second up (32 -> 8) multiplies first after an
    # upsampling, so it runs at the low resolution unless Winograd F(2x2) is asked for everywhere
    assert fused_blocks.count(True) == (5 if engine == "winograd" else 4)
    if engine == "auto" and parallel.blas_single_threaded():
        assert paths.count("winograd4") == 2  # 16 -> 32 at 4x4 and 32 -> 16 at 4x4
    assert got.dtype == dtype
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol
    assert np.abs(got - expected).max() * 127.5 < 0.5  # the same 8-bit colors


def test_textbook_engine_runs_no_fused_block(rng):
    model = unet_with_statistics(np.float64)
    block = model.bottleneck
    x = rng.standard_normal((1, 4, 4, 16))
    for mode in (model.train, model.eval):
        mode()
        with fast.use_engine("im2col"):
            assert fast.fused_block_forward(block, x, False) is None
        assert fast.fused_block_forward(block, x, False) is not None
    assert fast.fused_block_forward(block[:2], x, False) is None


@pytest.mark.parametrize("engine", ["auto", "gemm", "winograd"])
def test_unet_step_with_relu_in_the_batchnorm_pass_matches_textbook(engine, workers, rng):
    """In training a Conv + BatchNorm + ReLU block runs the ReLU inside BatchNorm's normalizing
    pass, and its backward passes the gradient through the ReLU inside BatchNorm's backward."""
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1))
    d_ab = rng.standard_normal((2, 8, 8, 2))
    results = []
    for name in ("im2col", engine):
        model = unet_with_statistics(np.float64).train()
        with fast.use_engine(name):
            ab = model.forward(lightness)
            assert all(fast.fused_in_training(block) == (name != "im2col") for block, _ in model.down)
            model.backward(d_ab)
        results.append((ab, [layer.grads[k].copy() for layer in model.param_layers for k in layer.params],
                        [layer.buffers["running_var"].copy() for layer in model.layers if isinstance(layer, BatchNorm2d)]))
    (ab_ref, grads_ref, stats_ref), (ab, grads, stats) = results
    relu_outputs = [block[1].cache[5] for block, _ in model.down]  # the fused run's ReLU outputs
    assert all((r == 0).any() and (r > 0).any() for r in relu_outputs)  # the mask matters
    np.testing.assert_allclose(ab, ab_ref, rtol=1e-12, atol=1e-13)
    for got, expected in zip(grads + stats, grads_ref + stats_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["auto", "gemm", "winograd"])
def test_seed_autoencoder_step_with_relu_in_the_conv_epilogue_matches_textbook(engine, workers, rng, monkeypatch):
    """Conv + ReLU blocks run as one conv in training too; backward reads the caches it left, and
    takes each encoder ReLU's backward in its pool's (fast.maxpool_relu_backward)."""
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1))
    d_ab = rng.standard_normal((2, 8, 8, 2))
    results, fused_pools, original = [], [], fast.maxpool_relu_backward
    monkeypatch.setattr(fast, "maxpool_relu_backward", lambda *a: fused_pools.append(original(*a)) or fused_pools[-1])
    for name in ("im2col", engine):
        model = ColorNet((4, 16, 16), seed=2, dtype=np.float64, arch="seed").train()
        with fast.use_engine(name):
            ab = model.forward(lightness)
            model.backward(d_ab)
        results.append((ab, [layer.grads[k].copy() for layer in model.param_layers for k in ("W", "b")]))
        fused = name != "im2col"
        assert all((block[1].cache[0] == "fast") == fused for block, _ in model.down)
        assert sum(d is not None for d in fused_pools) == (len(model.down) if fused else 0)
        fused_pools.clear()
    (ab_ref, grads_ref), (ab, grads) = results
    np.testing.assert_allclose(ab, ab_ref, rtol=1e-12, atol=1e-13)
    for got, expected in zip(grads, grads_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_seed_autoencoder_inference_keeps_no_caches_and_matches_textbook(dtype, tol, workers, rng,
                                                                                   monkeypatch):
    """In eval mode a Conv + ReLU block keeps no caches; its conv takes the engine's path."""
    lightness = rng.uniform(-1, 1, (3, 16, 16, 1)).astype(dtype)
    model = ColorNet((4, 16, 16), seed=2, dtype=dtype, arch="seed")  # eval mode, as a model starts
    with fast.use_engine("im2col"):
        expected = model.forward(lightness)
    paths, original_path = [], fast.conv2d_path

    def path(x, w):
        paths.append(original_path(x, w))
        return paths[-1]

    monkeypatch.setattr(fast, "conv2d_path", path)
    got = model.forward(lightness)
    assert len(paths) == 4  # 2 down, bottleneck, the first up; after an upsampling: fast.upsampled_block_forward
    if parallel.blas_single_threaded():
        assert "winograd4" in paths  # 16 -> 16 at 4x4 and 8x8
    assert all(block[0].cache is None and block[1].cache is None for block, _ in model.down)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol
    with pytest.raises(RuntimeError, match="model.train"):
        model.backward(np.ones_like(got))


@pytest.mark.parametrize("shape,skip_channels", [((2, 3, 5, 4), 3), ((1, 1, 1, 2), 5), ((3, 4, 2, 1), 1)])
def test_upsample_concat_in_one_pass_matches_the_layers(shape, skip_channels, workers, rng):
    x = rng.standard_normal(shape)
    N, H, W, _ = shape
    skip = rng.standard_normal((N, 2 * H, 2 * W, skip_channels))
    up, cat = Upsample2d(), Concat()
    with fast.use_engine("im2col"):
        expected = cat.forward(up.forward(x), skip)
        dout = rng.standard_normal(expected.shape)
        d_up, d_skip = cat.backward(dout)
        dx_expected = up.backward(d_up)
    up, cat = Upsample2d(), Concat()
    got = fast.upsample_concat_forward(up, cat, x, skip)
    np.testing.assert_array_equal(got, expected)
    d_up, d_skip_got = cat.backward(dout)  # the caches it left serve the layers' backward passes
    np.testing.assert_array_equal(d_skip_got, d_skip)
    np.testing.assert_allclose(up.backward(d_up), dx_expected, rtol=1e-13, atol=1e-14)  # sums in another order
    with fast.use_engine("im2col"):
        assert fast.upsample_concat_forward(up, cat, x, skip) is None
