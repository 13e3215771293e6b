"""The fast engine's BatchNorm2d (nanocolor/fast/norm.py), its blocks (fast.network.Block: Conv2d
(+ BatchNorm2d) (+ ReLU) (+ Tanh) in few passes) and the networks it runs (fast.Network), against
the textbook layers: BatchNorm's training forward and backward in float64 with one worker and
several, float32 with a large mean (the statistics must not cancel), the conv's ReLU epilogue on
every path, every block on every conv choice in training and inference (BatchNorm folded into
the conv), and whole U-Nets and seed autoencoders in training and inference."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import engine, fast
from nanocolor.fast import network, norm, parallel, resample
from nanocolor.fast.network import Block
from nanocolor.layers import BatchNorm2d, Concat, Conv2d, MaxPool2d, ReLU, Tanh, Upsample2d
from nanocolor.model import ColorNet

SHAPES = [(2, 3, 5, 4), (1, 9, 4, 3), (5, 6, 4, 2), (1, 1, 1, 3), (3, 40, 24, 7)]


def batchnorm(channels: int, rng, dtype) -> BatchNorm2d:
    bn = BatchNorm2d(channels, dtype=dtype)
    bn.params["gamma"] = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bn.params["beta"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_mean"] = rng.standard_normal(channels).astype(dtype)
    bn.buffers["running_var"] = rng.uniform(0.5, 2, channels).astype(dtype)
    return bn


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_training_matches_textbook(shape, relu, workers, rng):
    """norm.batchnorm2d_forward / _backward against BatchNorm2d (then ReLU, with `relu`: in the
    same pass, and backward takes the ReLU's output gradient)."""
    x = rng.standard_normal(shape) * 3 + 1
    dout = rng.standard_normal(shape)
    seed = int(rng.integers(1 << 30))
    bn = batchnorm(shape[-1], np.random.default_rng(seed), np.float64)  # the textbook
    out_ref = bn.forward(x)
    if relu:
        relu_layer = ReLU()
        out_ref = relu_layer.forward(out_ref)
        dx_ref = bn.backward(relu_layer.backward(dout))
        assert (out_ref == 0).any() and (out_ref > 0).any()  # the mask matters
    else:
        dx_ref = bn.backward(dout)
    expected = (out_ref, dx_ref, bn.grads["gamma"], bn.grads["beta"],
                bn.buffers["running_mean"], bn.buffers["running_var"])
    bn = batchnorm(shape[-1], np.random.default_rng(seed), np.float64)
    out, cache = norm.batchnorm2d_forward(bn, x, relu=relu)
    dx = norm.batchnorm2d_backward(bn, dout, cache)
    got = (out, dx, bn.grads["gamma"], bn.grads["beta"], bn.buffers["running_mean"], bn.buffers["running_var"])
    for textbook, fast_ in zip(expected, got):
        np.testing.assert_allclose(fast_, textbook, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_batchnorm_inference_matches_textbook(shape, relu, workers, rng):
    x = rng.standard_normal(shape)
    bn = batchnorm(shape[-1], rng, np.float64)
    bn.training = False
    stats = {name: a.copy() for name, a in bn.buffers.items()}
    expected = bn.forward(x)
    got, cache = norm.batchnorm2d_forward(bn, x, relu=relu)
    assert cache is None  # nothing for a backward
    np.testing.assert_allclose(got, np.maximum(expected, 0) if relu else expected, rtol=1e-12, atol=1e-12)
    for name, a in bn.buffers.items():
        np.testing.assert_array_equal(a, stats[name])  # the running statistics are only read


def test_batchnorm_float32_statistics_survive_a_large_mean(use_workers, rng):
    """Variance from per-piece sums about each piece's own mean: no cancellation when the mean is
    a thousand standard deviations away from zero."""
    use_workers(2)
    shape = (4, 32, 32, 8)
    x64 = rng.standard_normal(shape) * 0.1 + 100
    dout64 = rng.standard_normal(shape)
    exact = batchnorm(8, np.random.default_rng(5), np.float64)  # the textbook, in float64
    out_exact, dx_exact = exact.forward(x64), exact.backward(dout64)
    bn = batchnorm(8, np.random.default_rng(5), np.float32)
    x32 = x64.astype(np.float32)
    out, cache = norm.batchnorm2d_forward(bn, x32)
    dx = norm.batchnorm2d_backward(bn, dout64.astype(np.float32), cache)
    assert cache[0] is x32  # x kept, not x_hat: backward centres it again piece by piece
    assert out.dtype == dx.dtype == np.float32
    assert np.abs(out - out_exact).max() < 2e-3  # out is O(1): float32 x carries ~1e-5 of 100 / 0.1
    np.testing.assert_allclose(bn.buffers["running_var"], exact.buffers["running_var"], rtol=1e-3)
    assert np.linalg.norm(dx - dx_exact) / np.linalg.norm(dx_exact) < 1e-2


@pytest.mark.parametrize("path,shape,c_out", [("gemm", (2, 6, 5, 3), 4), ("gemm", (2, 5, 4, 8), 2),
                                              ("winograd", (3, 6, 4, 3), 5), ("winograd4", (2, 8, 4, 3), 5)])
def test_relu_epilogue_equals_relu_of_the_conv(path, shape, c_out, workers, rng):
    conv = make_conv(shape[-1], c_out, 3, dtype=np.float64)
    conv.params["b"] = rng.standard_normal(c_out)
    x = rng.standard_normal(shape)
    plain, _ = fast.conv2d_forward(x, conv.params["W"], conv.params["b"], path)
    fused, _ = fast.conv2d_forward(x, conv.params["W"], conv.params["b"], path, relu=True)
    assert (plain < 0).any() and (plain > 0).any()
    np.testing.assert_allclose(plain, conv.forward(x), rtol=1e-11, atol=1e-11)
    np.testing.assert_array_equal(fused, np.maximum(plain, 0))


# ---------------------------------------------------------------------------------------------
# Blocks: fast.network.Block against the textbook layers run in turn

KINDS = ["conv", "conv+relu", "conv+tanh", "conv+bn", "conv+bn+relu", "conv+bias+bn+relu"]


def block_layers(kind: str, c_in: int, c_out: int, seed: int = 0, dtype=np.float64) -> list:
    """Seeded layers of a block: a Conv2d (with a random bias unless a BatchNorm follows and
    `kind` does not say "bias"), then BatchNorm2d with non-trivial statistics, ReLU, Tanh as named."""
    r = np.random.default_rng(seed)
    parts = kind.split("+")
    conv = Conv2d(c_in, c_out, 3, rng=r, dtype=dtype, bias="bn" not in parts or "bias" in parts)
    if "b" in conv.params:
        conv.params["b"] = r.standard_normal(c_out).astype(dtype)
    layers = [conv]
    if "bn" in parts:
        layers.append(batchnorm(c_out, r, dtype))
    if "relu" in parts:
        layers.append(ReLU())
    if "tanh" in parts:
        layers.append(Tanh())
    return layers


def textbook_run(layers: list, x, dout=None) -> tuple:
    """(out, dx, grads, running statistics) of the layers run in turn; no backward without dout."""
    for layer in layers:
        x = layer.forward(x)
    if dout is None:
        return x, None, None, statistics_of(layers)
    dx = dout
    for layer in reversed(layers):
        dx = layer.backward(dx)
    return x, dx, grads_of(layers), statistics_of(layers)


def grads_of(layers: list) -> list:
    """Copies of every parameter gradient of `layers`, in order."""
    return [layer.grads[name].copy() for layer in layers for name in sorted(layer.params)]


def statistics_of(layers: list) -> list:
    """Copies of every BatchNorm2d's running mean and variance among `layers`, in order."""
    return [layer.buffers[k].copy() for layer in layers if isinstance(layer, BatchNorm2d)
            for k in ("running_mean", "running_var")]


def recording(monkeypatch, module, name: str, calls: list, take=lambda args, kwargs, result: result):
    """Replace module.name by a wrapper that appends take(args, kwargs, result) to `calls` for each call."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(take(args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)


# conv choice -> the path of a 3x3 conv of 16 -> 16 channels at (8x8, 6x10, 5x7) where BLAS runs one thread per call
BLOCK_SHAPES = [(2, 8, 8, 16), (1, 6, 10, 16), (3, 5, 7, 16)]
BLOCK_PATHS = {"auto": ("winograd4", "winograd", "gemm"), "gemm": ("gemm",) * 3,
               "winograd": ("winograd", "winograd", "gemm"), "winograd4": ("winograd4", "gemm", "gemm")}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("conv", fast.CONVS)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=["8x8", "6x10", "5x7"])
@pytest.mark.parametrize("kind", KINDS)
def test_block_matches_the_textbook_layers(kind, shape, conv, training, workers, rng, monkeypatch):
    """Block.forward and .backward: output, dx, every gradient and BatchNorm's running statistics
    are the textbook layers'; the conv takes the path `conv` asks for; the ReLU runs in the
    conv's last pass unless BatchNorm runs in training (then in BatchNorm's pass); in inference
    BatchNorm folds into the conv and nothing is kept."""
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    c_out = 16
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    reference, layers = block_layers(kind, shape[-1], c_out), block_layers(kind, shape[-1], c_out)
    for layer in reference + layers:
        if isinstance(layer, BatchNorm2d):
            layer.training = training
    out_ref, dx_ref, grads_ref, stats_ref = textbook_run(reference, x, dout if training else None)
    calls = []
    recording(monkeypatch, network, "conv2d_forward", calls,
              lambda args, kwargs, result: (args[3], kwargs.get("relu", False), result[1][0]))
    block = Block(layers)
    out, record = block.forward(x, conv, inference=not training)
    has_bn, has_relu = "bn" in kind, "relu" in kind
    path = BLOCK_PATHS[conv][BLOCK_SHAPES.index(shape)]
    assert calls == [(path, has_relu and (not has_bn or not training), path)]
    np.testing.assert_allclose(out, out_ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(statistics_of(layers), stats_ref, rtol=1e-11, atol=1e-12)
    if not training:
        assert record is None
        return
    dx, dskip = block.backward(dout, record)
    assert dskip is None
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-11)
    assert len(grads_of(layers)) == len(grads_ref) == 1 + ("bias" in kind or not has_bn) + 2 * has_bn
    for got, expected in zip(grads_of(layers), grads_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", ["conv+relu", "conv+bn+relu"])
def test_block_without_input_grad_fills_the_grads(kind, rng):
    """A network's first conv has no input gradient: backward gives None and still every grad."""
    x, dout = rng.standard_normal((2, 6, 4, 3)), rng.standard_normal((2, 6, 4, 5))
    reference, layers = block_layers(kind, 3, 5), block_layers(kind, 3, 5)
    reference[0].input_grad = layers[0].input_grad = False
    _, dx_ref, grads_ref, _ = textbook_run(reference, x, dout)
    block = Block(layers)
    dx, dskip = block.backward(dout, block.forward(x, "auto", inference=False)[1])
    assert dx is None and dx_ref is None and dskip is None
    for got, expected in zip(grads_of(layers), grads_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


def test_block_backward_with_the_relu_done(rng):
    """relu_done: the gradient already went through the ReLU's mask (a seed network's max-pool does it)."""
    x, dout = rng.standard_normal((2, 6, 4, 3)), rng.standard_normal((2, 6, 4, 5))
    block = Block(block_layers("conv+relu", 3, 5))
    out, record = block.forward(x, "gemm", inference=False)
    assert (out == 0).any()
    dx, _ = block.backward(dout, record)
    dw = block.conv.grads["W"].copy()
    dx_done, _ = block.backward(dout * (out > 0), record, relu_done=True)
    np.testing.assert_allclose(dx_done, dx, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(block.conv.grads["W"], dw, rtol=1e-13, atol=1e-14)
    dx_twice, _ = block.backward(dout, record, relu_done=True)  # the mask really is skipped
    assert not np.allclose(dx_twice, dx)


def test_block_takes_only_conv_blocks():
    conv, bn, relu, tanh = Conv2d(2, 3, dtype=np.float64), BatchNorm2d(3), ReLU(), Tanh()
    for layers in ([conv, bn, relu], [conv, relu], [conv, bn], [conv, tanh], [conv], [conv, bn, relu, tanh]):
        block = Block(layers)
        assert block.conv is conv
        assert block.bn is (bn if bn in layers else None) and block.relu is (relu if relu in layers else None)
        assert block.tanh is (tanh if tanh in layers else None)
    for layers in ([bn, conv], [conv, relu, bn], [conv, MaxPool2d()], [relu], [conv, tanh, relu], [conv, bn, bn]):
        with pytest.raises(ValueError, match="Conv2d"):
            Block(layers)


# ---------------------------------------------------------------------------------------------
# Whole networks: engine.network(model) against the textbook model

def unet_with_statistics(dtype, seed: int = 3) -> ColorNet:
    """A U-Net in inference mode whose BatchNorms are not the identity."""
    model = ColorNet((8, 16, 32), arch="unet", seed=seed, dtype=dtype)
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            fresh = batchnorm(layer.params["gamma"].size, r, dtype)
            layer.params, layer.buffers = fresh.params, fresh.buffers
    return model.eval()


def fast_network(model: ColorNet, conv: str) -> fast.Network:
    with engine.use_conv(conv):
        runner = engine.network(model)
    assert isinstance(runner, fast.Network) and runner.model is model
    return runner


def test_im2col_runs_the_textbook_model():
    model = unet_with_statistics(np.float64)
    with engine.use_conv("im2col"):
        assert engine.network(model) is model and not engine.uses_fast()
    for conv in fast.CONVS:
        assert fast_network(model, conv).conv == conv


# The U-Net (8, 16, 32) at 16x16 in inference, BLAS one thread per call: the paths of the convs its
# blocks run (2 down at 16x16 and 8x8, the bottleneck and the first up at 4x4, then those of the
# blocks after an upsampling that take the joined map), and upsampled_conv_path's answers for the
# second up (32 -> 8 at 8x8) and the head (16 -> 2 at 16x16). Both multiply first: under gemm (and
# auto, for few channels) their upsampled channels' products add in at the low resolution.
UNET_INFERENCE = {
    "auto": (["gemm", "gemm", "winograd4", "winograd4"], ["shift", "shift"]),
    "gemm": (["gemm"] * 4, ["shift", "shift"]),
    "winograd": (["winograd"] * 6, [None, None]),
    "winograd4": (["winograd4"] * 6, [None, None]),
}


@pytest.mark.parametrize("conv", fast.CONVS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_unet_inference_with_folded_batchnorm_matches_textbook(conv, dtype, tol, workers, monkeypatch):
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    lightness = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1)).astype(dtype)
    model = unet_with_statistics(dtype)
    expected = model.forward(lightness)  # the textbook
    paths, ups, folds = [], [], []
    recording(monkeypatch, network, "conv2d_path", paths)
    recording(monkeypatch, network, "upsampled_conv_path", ups)
    recording(monkeypatch, network, "folded_weights", folds, lambda args, kwargs, result: args[1])
    runner = fast_network(model, conv)
    got = runner.forward(lightness)
    assert (paths, ups) == UNET_INFERENCE[conv]
    bns = [layer for layer in model.layers if isinstance(layer, BatchNorm2d)]
    assert len(folds) == len(bns) and all(a is b for a, b in zip(folds, bns))  # every BatchNorm folded, in order
    assert runner.records == []  # nothing kept for a backward
    assert got.dtype == dtype
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol
    assert np.abs(got - expected).max() * 127.5 < 0.5  # the same 8-bit colors


def training_step(runner, lightness, d_ab, check=lambda runner: None) -> tuple:
    """(ab, every gradient, every BatchNorm running statistic) of a forward + backward of `runner`
    (a ColorNet or a fast.Network) in training mode; check(runner) between the two."""
    runner.train()
    ab = runner.forward(lightness)
    check(runner)
    runner.backward(d_ab)
    model = getattr(runner, "model", runner)
    return ab, grads_of(model.layers), statistics_of(model.layers)


def assert_same_step(got: tuple, expected: tuple) -> None:
    (ab, grads, stats), (ab_ref, grads_ref, stats_ref) = got, expected
    assert len(grads) == len(grads_ref) and len(stats) == len(stats_ref)
    np.testing.assert_allclose(ab, ab_ref, rtol=1e-12, atol=1e-13)
    for g, e in zip(grads + stats, grads_ref + stats_ref):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", fast.CONVS)
def test_unet_step_with_relu_in_the_batchnorm_pass_matches_textbook(conv, workers, rng):
    """In training a Conv + BatchNorm + ReLU block runs the ReLU inside BatchNorm's normalizing
    pass, and its backward passes the gradient through the ReLU inside BatchNorm's backward."""
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1))
    d_ab = rng.standard_normal((2, 8, 8, 2))
    expected = training_step(unet_with_statistics(np.float64), lightness, d_ab)
    model = unet_with_statistics(np.float64)
    relu_outputs = []

    def check(runner):
        # the encoder blocks' records, each followed by its max-pool's: (conv record, BatchNorm cache, out)
        for record in runner.records[0:2 * len(model.down):2]:
            _, bn_cache, out = record
            assert bn_cache[4] is out  # BatchNorm ran with the ReLU: its output is the mask
            relu_outputs.append(out)

    assert_same_step(training_step(fast_network(model, conv), lightness, d_ab, check), expected)
    assert len(relu_outputs) == len(model.down)
    assert all((r == 0).any() and (r > 0).any() for r in relu_outputs)  # the mask matters


@pytest.mark.parametrize("conv", fast.CONVS)
def test_seed_autoencoder_step_with_relu_in_the_conv_epilogue_matches_textbook(conv, workers, rng, monkeypatch):
    """Conv + ReLU blocks run as one conv in training too; backward takes each encoder ReLU's
    mask in its max-pool's backward (maxpool2d_backward's `relu`)."""
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1))
    d_ab = rng.standard_normal((2, 8, 8, 2))
    expected = training_step(ColorNet((4, 16, 16), seed=2, dtype=np.float64, arch="seed"), lightness, d_ab)
    model = ColorNet((4, 16, 16), seed=2, dtype=np.float64, arch="seed")
    epilogues, pools = [], []
    recording(monkeypatch, network, "conv2d_forward", epilogues, lambda args, kwargs, result: kwargs.get("relu"))
    recording(monkeypatch, network, "maxpool2d_backward", pools, lambda args, kwargs, result: kwargs.get("relu"))
    assert_same_step(training_step(fast_network(model, conv), lightness, d_ab), expected)
    # 2 down, the bottleneck and the first up: conv + ReLU; after an upsampling the conv runs at
    # the low resolution under auto, else on the upsampled map: one more with a ReLU, the head without
    assert epilogues == [True] * 4 + ([] if conv == "auto" else [True, False])
    assert pools == [True] * len(model.down)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_seed_autoencoder_inference_keeps_no_caches_and_matches_textbook(dtype, tol, workers, rng, monkeypatch):
    """In eval mode the network keeps no records and writes nothing into the layers; its convs
    take the paths of "auto"."""
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    lightness = rng.uniform(-1, 1, (3, 16, 16, 1)).astype(dtype)
    # eval mode, as a model starts
    expected = ColorNet((4, 16, 16), seed=2, dtype=dtype, arch="seed").forward(lightness)  # the textbook
    model = ColorNet((4, 16, 16), seed=2, dtype=dtype, arch="seed")
    paths, ups = [], []
    recording(monkeypatch, network, "conv2d_path", paths)
    recording(monkeypatch, network, "upsampled_conv_path", ups)
    runner = fast_network(model, "auto")
    got = runner.forward(lightness)
    assert paths == ["gemm", "gemm", "winograd4", "winograd4"]  # 1 -> 4, 4 -> 16 (thin: gemm), 16 -> 16 at 4x4
    assert ups == ["phases", "phases"]  # after each upsampling, at the low resolution
    assert runner.records == []
    assert not any(hasattr(layer, "cache") for layer in model.layers)  # the layers are only read
    assert got.dtype == dtype
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol
    with pytest.raises(RuntimeError, match="model.train"):
        runner.backward(np.ones_like(got))


@pytest.mark.parametrize("shape,skip_channels", [((2, 3, 5, 4), 3), ((1, 1, 1, 2), 5), ((3, 4, 2, 1), 1)])
def test_upsample_concat_in_one_pass_matches_the_layers(shape, skip_channels, workers, rng):
    """norm.upsample_concat_forward = Concat(Upsample2d(x), skip); the joined map's gradient
    split as the fast block does it (a view of the upsampled channels, summed back to x's size)
    gives the layers' gradients."""
    x = rng.standard_normal(shape)
    N, H, W, C = shape
    skip = rng.standard_normal((N, 2 * H, 2 * W, skip_channels))
    up, cat = Upsample2d(), Concat()
    expected = cat.forward(up.forward(x), skip)
    dout = rng.standard_normal(expected.shape)
    d_up, d_skip = cat.backward(dout)
    dx_expected = up.backward(d_up)
    got = norm.upsample_concat_forward(x, skip)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(dout[..., C:], d_skip)
    np.testing.assert_allclose(resample.upsample2d_backward(dout[..., :C]), dx_expected, rtol=1e-13, atol=1e-14)
