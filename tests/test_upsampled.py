"""The conv of a nearest-upsampled map at the low resolution (nanocolor/fast/upsampled.py) and the
blocks that use it (fast.network.Block.forward_upsampled / backward, by each of the ways
fast.upsampled_conv_path names, or the joined map): against the textbook Upsample2d (+ Concat)
+ Conv2d (+ BatchNorm2d) (+ ReLU / Tanh) in float64, a gradient check, which way is chosen for
which conv choice, and whole networks (engine.network) in training and inference."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv
from nanocolor import engine, fast
from nanocolor.fast import gemm, network, parallel, upsampled, winograd, winograd4
from nanocolor.fast.network import Block
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import BatchNorm2d, Concat, Conv2d, ReLU, Tanh, Upsample2d
from nanocolor.model import ColorNet

# (low-resolution x shape, output channels): odd and one-pixel sizes; channels-first (F < 8) and
# channels-last products; batches that split into several pieces
CASES = [((2, 3, 5, 4), 3), ((1, 1, 1, 2), 2), ((3, 4, 2, 5), 9), ((1, 2, 7, 3), 8), ((40, 2, 3, 2), 16)]


def textbook(x, conv):
    """conv(upsample2x(x)) and its backward by the textbook layers, for a random dout:
    (out, dout, dx, dW)."""
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


# ---------------------------------------------------------------------------------------------
# Which way upsampled_conv_path names, for which conv choice

def expected_way(conv: str, k: int, h: int, w_: int, c_up: int, c_skip, F: int, inference: bool, single: bool):
    """upsampled_conv_path's answer, from its rules: "shift" in inference after a Concat where the
    joined map's conv multiplies first (4F <= C) by gemm.py; else the low-resolution ways under
    "auto" only, for 3x3 kernels; None (the joined map) otherwise."""
    C = c_up + (c_skip or 0)
    by_4 = h % 2 == 0 and w_ % 2 == 0  # the upsampled sides 2h, 2w divide by 4
    joined_by_gemm = {"gemm": True, "winograd": k != 3, "winograd4": k != 3 or not by_4,
                      "auto": k != 3 or min(C, F) < 16 or not single or not by_4}[conv]
    if c_skip is not None and inference and 4 * F <= C and k > 1 and joined_by_gemm:
        return "shift"
    if conv != "auto" or k != 3:
        return None
    if c_skip is None:
        return "phases"
    return "winograd4" if single and min(c_skip, F) >= 16 and by_4 else "phases+skip"


@pytest.mark.parametrize("single", [True, False], ids=["blas1", "blasN"])
@pytest.mark.parametrize("conv", fast.CONVS)
def test_upsampled_conv_path_answers(conv, single, monkeypatch):
    """Every conv choice but "auto" takes the joined map (None), except "shift" in inference where
    the joined map's conv would be gemm.py's multiply-first; "--conv gemm" never takes Winograd."""
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: single)
    seen = set()
    for k in (1, 3, 5):
        for h, w_ in ((2, 2), (3, 5), (1, 4), (4, 6)):
            for c_up, c_skip, F in ((8, 8, 2), (16, 16, 8), (64, 64, 32), (8, 8, 16), (16, 16, 16), (4, None, 2),
                                    (64, None, 16)):
                for inference in (False, True):
                    x_low = np.zeros((2, h, w_, c_up))
                    skip = None if c_skip is None else np.zeros((2, 2 * h, 2 * w_, c_skip))
                    w = np.zeros((k, k, c_up + (c_skip or 0), F))
                    way = fast.upsampled_conv_path(x_low, skip, w, conv, inference)
                    assert way == expected_way(conv, k, h, w_, c_up, c_skip, F, inference, single), \
                        (k, h, w_, c_up, c_skip, F, inference)
                    if conv != "auto":
                        assert way is None or (way == "shift" and inference and skip is not None)
                    if way is None and skip is not None:  # the joined map's conv, by the conv choice
                        joined = np.zeros((2, 2 * h, 2 * w_, w.shape[2]))
                        assert conv != "gemm" or fast.conv2d_path(joined, w, conv) == "gemm"
                    seen.add(way)
    assert seen == ({None, "shift", "phases", "phases+skip"} | ({"winograd4"} if single else set())
                    if conv == "auto" else {None, "shift"})


# ---------------------------------------------------------------------------------------------
# Block.forward_upsampled / backward against the textbook layers

def block_layers(kind: str, c_in: int, c_out: int, k: int = 3, seed: int = 0) -> list:
    """Seeded float64 layers of a block: a Conv2d (a random bias unless a BatchNorm follows),
    then BatchNorm2d with non-trivial statistics, ReLU, Tanh as `kind` names them."""
    r = np.random.default_rng(seed)
    parts = kind.split("+")
    conv = Conv2d(c_in, c_out, k, rng=r, dtype=np.float64, bias="bn" not in parts)
    if "b" in conv.params:
        conv.params["b"] = r.standard_normal(c_out)
    layers = [conv]
    if "bn" in parts:
        bn = BatchNorm2d(c_out, dtype=np.float64)
        bn.params["gamma"], bn.params["beta"] = r.uniform(0.5, 1.5, c_out), r.standard_normal(c_out)
        bn.buffers["running_mean"], bn.buffers["running_var"] = r.standard_normal(c_out), r.uniform(0.5, 2, c_out)
        layers.append(bn)
    if "relu" in parts:
        layers.append(ReLU())
    if "tanh" in parts:
        layers.append(Tanh())
    return layers


def grads_and_statistics(layers: list) -> list:
    """Copies of every parameter gradient, then every BatchNorm running statistic, of `layers`."""
    return [layer.grads[name].copy() for layer in layers for name in sorted(layer.params)] + \
        [layer.buffers[name].copy() for layer in layers if isinstance(layer, BatchNorm2d)
         for name in ("running_mean", "running_var")]


# (way, block kind, x_low shape, skip channels or None, output channels, conv choice, kernel, inference or both)
# with BLAS one thread per call: each way of upsampled_conv_path, and the joined map (None)
UPSAMPLED_CASES = [
    ("shift", "conv+tanh", (2, 3, 4, 8), 8, 2, "auto", 3, [True]),            # the U-Net's head
    ("shift", "conv+bn+relu", (2, 3, 5, 16), 16, 8, "gemm", 3, [True]),      # 4F <= C: multiplies first
    ("shift", "conv+bn+relu", (1, 3, 5, 12), 4, 4, "winograd4", 3, [True]),  # 6x10: no F(4x4), so gemm
    ("phases", "conv+relu", (2, 3, 5, 4), None, 6, "auto", 3, [False, True]),  # the seed network
    ("phases", "conv+tanh", (3, 1, 1, 4), None, 2, "auto", 3, [False, True]),  # its head
    ("phases", "conv+bn+relu", (2, 2, 3, 5), None, 9, "auto", 3, [False, True]),
    ("winograd4", "conv+bn+relu", (2, 2, 4, 16), 16, 16, "auto", 3, [False, True]),
    ("winograd4", "conv+relu", (1, 4, 2, 16), 24, 16, "auto", 3, [False, True]),
    ("phases+skip", "conv+bn+relu", (2, 3, 5, 4), 4, 6, "auto", 3, [False, True]),   # the skip's conv by gemm
    ("phases+skip", "conv+bn+relu", (1, 3, 5, 16), 16, 16, "auto", 3, [False, True]),  # ... by F(2x2)
    ("phases+skip", "conv+tanh", (2, 3, 4, 8), 8, 2, "auto", 3, [False]),             # the head in training
    (None, "conv+bn+relu", (2, 3, 5, 4), 4, 6, "gemm", 3, [False, True]),
    (None, "conv+tanh", (2, 3, 4, 8), 8, 2, "gemm", 3, [False]),              # shift in inference only
    (None, "conv+relu", (2, 3, 5, 4), None, 6, "winograd", 3, [False, True]),
    (None, "conv+bn+relu", (2, 2, 4, 16), 16, 16, "winograd4", 3, [False, True]),
    (None, "conv+bn+relu", (1, 2, 2, 4), 4, 2, "winograd4", 3, [True]),        # joined 4x4: F(4x4), no shift
    (None, "conv+bn+relu", (2, 2, 3, 4), 4, 6, "auto", 5, [False, True]),     # 5x5: no phases
    (None, "conv+relu", (2, 2, 3, 4), None, 6, "auto", 1, [False, True]),
]
CASE_IDS = [f"{way or 'joined'}-{kind}-{conv}-{k}x{k}-{'skip' if cs else 'noskip'}-{i}"
            for i, (way, kind, _, cs, _, conv, k, _) in enumerate(UPSAMPLED_CASES)]


@pytest.mark.parametrize("case", UPSAMPLED_CASES, ids=CASE_IDS)
def test_upsampled_block_matches_the_textbook_layers(case, workers, rng, monkeypatch):
    """Block.forward_upsampled takes the way upsampled_conv_path names (by that way's function,
    or upsample (+ join) then the conv); output, dx of the low-resolution input, dskip, every
    gradient and BatchNorm's running statistics are those of the textbook Upsample2d (+ Concat)
    and the block's layers, in training; in inference (BatchNorm folded) the output."""
    way, kind, low_shape, c_skip, F, conv, k, modes = case
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    N, h, w_, c_up = low_shape
    x_low = rng.standard_normal(low_shape)
    skip = None if c_skip is None else rng.standard_normal((N, 2 * h, 2 * w_, c_skip))
    dout = rng.standard_normal((N, 2 * h, 2 * w_, F))
    taken = []
    for name, function in network.UPSAMPLED_CONVS.items():
        monkeypatch.setitem(network.UPSAMPLED_CONVS, name,
                            lambda *args, _name=name, _function=function: taken.append(_name) or _function(*args))
    for name in ("upsample_concat_forward", "upsample2d_forward"):
        original = getattr(network, name)
        monkeypatch.setattr(network, name, lambda *args, _name=name, _original=original:
                            taken.append(_name) or _original(*args))
    joined_by = "upsample2d_forward" if skip is None else "upsample_concat_forward"
    for inference in modes:
        reference, layers = (block_layers(kind, c_up + (c_skip or 0), F, k) for _ in range(2))
        for layer in reference + layers:
            if isinstance(layer, BatchNorm2d):
                layer.training = not inference
        assert fast.upsampled_conv_path(x_low, skip, layers[0].params["W"], conv, inference) == way
        up, cat = Upsample2d(), Concat()
        x = up.forward(x_low) if skip is None else cat.forward(up.forward(x_low), skip)
        for layer in reference:
            x = layer.forward(x)
        expected = x
        taken.clear()
        block = Block(layers)
        out, record = block.forward_upsampled(x_low, skip, conv, inference)
        assert taken == [way or joined_by]
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)
        if inference:
            assert record is None
            for got, want in zip(layers[1:2], reference[1:2]):
                if isinstance(got, BatchNorm2d):  # the running statistics, only read
                    for name in ("running_mean", "running_var"):
                        np.testing.assert_array_equal(got.buffers[name], want.buffers[name])
            continue
        d = dout
        for layer in reversed(reference):
            d = layer.backward(d)
        d_up, dskip_expected = (d, None) if skip is None else cat.backward(d)
        dx_expected = up.backward(d_up)
        dx, dskip = block.backward(dout, record)
        np.testing.assert_allclose(dx, dx_expected, rtol=1e-10, atol=1e-11)
        if skip is None:
            assert dskip is None
        else:
            np.testing.assert_allclose(dskip, dskip_expected, rtol=1e-10, atol=1e-11)
        got, want = grads_and_statistics(layers), grads_and_statistics(reference)
        assert len(got) == len(want) == 1 + ("bn" not in kind) + 4 * ("bn" in kind)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-11)


def test_every_way_is_covered():
    """The cases above take every way upsampled_conv_path names, and the joined map, in training and in inference."""
    ways = {(way, inference) for way, *_, modes in UPSAMPLED_CASES for inference in modes}
    assert ways == {(way, inference) for way in (*network.UPSAMPLED_CONVS, None) for inference in (False, True)} - \
        {("shift", False)}


# ---------------------------------------------------------------------------------------------
# Whole networks: engine.network(model) against the textbook model

def recording_ways(monkeypatch) -> list:
    """Record upsampled_conv_path's answer for each block after an upsampling that the fast engine runs."""
    ways, original = [], network.upsampled_conv_path
    monkeypatch.setattr(network, "upsampled_conv_path", lambda *args: ways.append(original(*args)) or ways[-1])
    return ways


def fast_network(model: ColorNet, conv: str) -> fast.Network:
    with engine.use_conv(conv):
        runner = engine.network(model)
    assert isinstance(runner, fast.Network) and runner.conv == conv
    return runner


def with_statistics(model: ColorNet, seed: int = 3, dtype=np.float64) -> ColorNet:
    """BatchNorm layers whose scale, shift and running statistics are not the identity; every
    parameter and statistic in `dtype`."""
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            C = layer.params["gamma"].size
            layer.params["gamma"], layer.params["beta"] = r.uniform(0.5, 1.5, C), r.standard_normal(C)
            layer.buffers["running_mean"], layer.buffers["running_var"] = r.standard_normal(C), r.uniform(0.5, 2, C)
    for layer in model.param_layers:
        for store in (layer.params, getattr(layer, "buffers", {})):
            for name in store:
                store[name] = store[name].astype(dtype)
    return model


def step(runner, lightness, d_ab) -> tuple:
    """(ab, every gradient, every BatchNorm running variance) of a training step of `runner`."""
    runner.train()
    ab = runner.forward(lightness)
    runner.backward(d_ab)
    model = getattr(runner, "model", runner)
    return (ab, [layer.grads[k].copy() for layer in model.param_layers for k in layer.params],
            [layer.buffers[k].copy() for layer in model.layers if isinstance(layer, BatchNorm2d)
             for k in ("running_mean", "running_var")])


def assert_same_step(got: tuple, expected: tuple, rtol: float = 1e-10) -> None:
    (ab, grads, stats), (ab_ref, grads_ref, stats_ref) = got, expected
    assert len(grads) == len(grads_ref) and len(stats) == len(stats_ref)
    np.testing.assert_allclose(ab, ab_ref, rtol=1e-12, atol=1e-13)
    for g, e in zip(grads + stats, grads_ref + stats_ref):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("arch,widths,ways", [("seed", (4, 16, 16), ["phases", "phases"]),
                                               ("unet", (8, 16, 32), ["phases+skip", "phases+skip"]),
                                               ("unet", (32, 16), ["phases+skip"])])
def test_network_training_step_matches_textbook(arch, widths, ways, workers, rng, monkeypatch):
    """Every block after an upsampling runs at the low resolution in training under "auto" (its
    backward too), and output, gradients and BatchNorm statistics are the textbook network's."""
    lightness = rng.uniform(-1, 1, (3, 8, 12, 1))
    d_ab = rng.standard_normal((3, 8, 12, 2))
    taken = recording_ways(monkeypatch)
    expected = step(with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64)), lightness, d_ab)
    assert taken == []  # the textbook model runs no fast block
    runner = fast_network(with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64)), "auto")
    assert_same_step(step(runner, lightness, d_ab), expected)
    assert taken == ways and len(ways) == len(widths) - 1


@pytest.mark.parametrize("conv", ["gemm", "winograd", "winograd4"])
def test_other_convs_train_on_the_upsampled_map(conv, rng, monkeypatch):
    """The "gemm", "winograd" and "winograd4" choices mean every conv by that path: no block at low
    resolution in training; gemm takes no Winograd conv at all. The step is the textbook's."""
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)  # where "auto" would take Winograd
    lightness, d_ab = rng.uniform(-1, 1, (2, 8, 8, 1)), rng.standard_normal((2, 8, 8, 2))
    taken = recording_ways(monkeypatch)
    low_resolution = []
    for name, function in network.UPSAMPLED_CONVS.items():
        monkeypatch.setitem(network.UPSAMPLED_CONVS, name, lambda *args, _name=name: low_resolution.append(_name))
    algorithms = []
    for module in (gemm, winograd, winograd4):
        original = module.forward
        monkeypatch.setattr(module, "forward", lambda *args, _original=original, _name=module.__name__, **kwargs:
                            algorithms.append(_name.rsplit(".", 1)[-1]) or _original(*args, **kwargs))
    widths = (16, 32, 32)
    expected = step(with_statistics(ColorNet(widths, arch="unet", seed=2, dtype=np.float64)), lightness, d_ab)
    assert_same_step(step(fast_network(with_statistics(ColorNet(widths, arch="unet", seed=2, dtype=np.float64)), conv),
                          lightness, d_ab), expected)
    assert taken == [None, None] and low_resolution == []
    # every conv (2 down at 8x8 and 4x4, bottleneck and first up at 2x2, 4x4, 8x8) by the algorithm
    # asked for where it applies: F(4x4) needs sizes that divide by 4
    assert algorithms == {"gemm": ["gemm"] * 6, "winograd": ["winograd"] * 6,
                          "winograd4": ["winograd4", "winograd4", "gemm", "gemm", "winograd4", "winograd4"]}[conv]


@pytest.mark.parametrize("arch,widths,ways", [("seed", (8, 16, 32), ["phases", "phases"]),
                                               ("unet", (8, 16, 32), ["shift", "shift"]),
                                               ("unet", (32, 64), ["shift"])])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_network_inference_matches_textbook(arch, widths, ways, dtype, tol, workers, rng, monkeypatch):
    """In eval mode too (BatchNorm folded into the conv, the ReLU in its last pass); the U-Net's
    blocks after a Concat multiply first and take the upsampled products at the low resolution."""
    lightness = rng.uniform(-1, 1, (2, 8, 12, 1)).astype(dtype)
    expected = with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64), dtype=dtype).forward(lightness)
    model = with_statistics(ColorNet(widths, arch=arch, seed=2, dtype=np.float64), dtype=dtype)
    taken = recording_ways(monkeypatch)
    heads, original = [], gemm.multiply_then_shift
    monkeypatch.setattr(gemm, "multiply_then_shift", lambda *a, **k: heads.append(k.get("upsampled") is not None) or original(*a, **k))
    runner = fast_network(model, "auto")
    got = runner.forward(lightness)
    assert taken == ways
    assert (True in heads) == (arch == "unet")
    assert runner.records == [] and not any(hasattr(layer, "cache") for layer in model.layers)  # none kept
    assert got.dtype == dtype
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_unet_decoder_conv_as_one_winograd_conv(dtype, tol, use_workers, rng, monkeypatch):
    """A U-Net decoder block whose skip conv Winograd F(4x4) takes (channels >= 16, sizes that
    divide by 4) runs as one F(4x4) conv of the joined input (winograd4.forward's `upsampled`):
    a training step (output, every gradient, BatchNorm statistics) and inference match the textbook."""
    use_workers(2)
    # "auto" takes Winograd where BLAS runs one thread per call
    monkeypatch.setattr(parallel, "blas_single_threaded", lambda: True)
    joined, original = [], winograd4.forward
    monkeypatch.setattr(winograd4, "forward", lambda *a, **k: joined.append(k.get("upsampled") is not None) or original(*a, **k))
    taken = recording_ways(monkeypatch)
    lightness = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(dtype)
    d_ab = rng.standard_normal((2, 16, 16, 2)).astype(dtype)
    results = []
    for fast_engine in (False, True):
        model = with_statistics(ColorNet((16, 16, 16), arch="unet", seed=2, dtype=np.float64), dtype=dtype)
        runner = fast_network(model, "auto") if fast_engine else model
        inferred = runner.forward(lightness)
        results.append((inferred, *step(runner, lightness, d_ab)))
    assert joined.count(True) == 2  # the 8x8 block (16 upsampled + 16 skip channels), in eval and in training
    assert taken == ["winograd4", "shift", "winograd4", "phases+skip"]  # the head: 32 -> 2, eval then training
    (inf_ref, ab_ref, grads_ref, stats_ref), (inf, ab, grads, stats) = results
    assert len(grads) == len(grads_ref) and len(stats) == len(stats_ref)
    for got, expected in zip([inf, ab] + grads + stats, [inf_ref, ab_ref] + grads_ref + stats_ref):
        assert got.dtype == dtype
        assert np.linalg.norm(got - expected) <= tol * np.linalg.norm(expected)
