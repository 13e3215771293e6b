"""The fast engine (nanocolor/fast) against the textbook (nanocolor/layers.py, model.py): every
conv algorithm against the textbook Conv2d, max-pool, upsample and ReLU against the textbook
layers (and a loop reference), whole networks run by `engine.network` against the model's own
forward and backward (outputs, every gradient, BatchNorm's running statistics, in training and
in inference), the engine seam (nanocolor/engine.py), the CPU worker pool (same numbers with one
worker or several), scratch and prepared weights, GEMM helpers, and Adam over the workers.
The textbook's own gradient checks: tests/test_layers.py."""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import adam_reference, make_conv
from nanocolor import engine, fast
from nanocolor.fast import gemm, network, parallel, winograd, winograd4
from nanocolor.fast.resample import (maxpool2d_backward, maxpool2d_forward, relu_backward, upsample2d_backward,
                                     upsample2d_forward)
from nanocolor.layers import BatchNorm2d, MaxPool2d, ReLU, Upsample2d
from nanocolor.loss import MSELoss
from nanocolor.model import ColorNet
from nanocolor.optim import Adam
from nanocolor.trainer import train_step

CONVS = ("gemm", "winograd", "winograd4", "auto")  # the fast engine's conv algorithms

MATCH_CASES = [
    ((2, 5, 7, 3), 4, 3),    # odd sizes
    ((1, 4, 6, 1), 2, 3),    # batch 1, one input channel: the workers split image rows
    ((2, 4, 6, 3), 4, 3),    # even sizes, non-square: Winograd F(2x2) tiles
    ((1, 2, 2, 1), 2, 3),    # a single F(2x2) tile
    ((1, 4, 8, 2), 3, 3),    # sizes divisible by 4: Winograd F(4x4) tiles
    ((1, 6, 4, 5), 1, 3),    # one output channel
    ((3, 3, 5, 2), 3, 1),    # 1x1 kernel: the patch matrix is x itself
    ((1, 7, 5, 2), 3, 5),    # 5x5 kernel wider than the padding on a small image
    ((1, 2, 3, 1), 1, 5),    # kernel larger than the image
    ((2, 5, 4, 8), 2, 3),    # 4F <= C: gemm multiplies first, then adds shifted slices
    ((2, 4, 4, 8), 2, 3),    # ... on even sizes
    ((2, 5, 6, 32), 8, 3),   # ... with F >= 8: the products channels-last
    ((1, 2, 3, 9), 2, 5),    # ... with a kernel larger than the image
    ((5, 6, 4, 3), 5, 3),    # more images than pieces
    ((1, 9, 4, 2), 3, 3),    # one image in bands of rows
    ((2, 8, 8, 16), 16, 3),  # channels enough for "auto" to take Winograd
    ((1, 6, 10, 16), 20, 3),  # ... on sizes even but not divisible by 4
]


def expected_path(conv: str, x, w) -> str:
    """The algorithm a conv must run under `conv`: Winograd fits 3x3 kernels on even sizes, F(4x4)
    on sizes divisible by 4, and "auto" picks per shape (fast.conv2d_path, one of the three)."""
    k, H, W = w.shape[0], x.shape[1], x.shape[2]
    if conv == "winograd":
        return "winograd" if winograd.applies(k, H, W) else "gemm"
    if conv == "winograd4":
        return "winograd4" if winograd4.applies(k, H, W) else "gemm"
    if conv == "auto":
        path = fast.conv2d_path(x, w, "auto")
        assert path in ("gemm", "winograd", "winograd4")
        return path
    return "gemm"


def textbook_conv(conv_args: tuple, x, dout, input_grad: bool = True, dtype=np.float64) -> tuple:
    """(out, dx, grads) of the textbook Conv2d (make_conv's weights) on x and dout."""
    layer = make_conv(*conv_args, dtype=dtype)
    layer.input_grad = input_grad
    out = layer.forward(x.astype(dtype))
    dx = layer.backward(dout.astype(dtype))
    return out, dx, layer.grads


def fast_conv(conv: str, conv_args: tuple, x, dout, input_grad: bool = True, dtype=np.float64) -> tuple:
    """(out, dx, {"W": dW, "b": db}, path) of the fast engine's conv `conv`, from make_conv's weights."""
    layer = make_conv(*conv_args, dtype=dtype)
    w, b = layer.params["W"], layer.params["b"]
    x = x.astype(dtype)
    path = fast.conv2d_path(x, w, conv)
    out, cache = fast.conv2d_forward(x, w, b, path)
    assert cache[0] == path  # the cache names the algorithm that made it
    dx, dw, db = fast.conv2d_backward(dout.astype(dtype), w, cache, input_grad)
    return out, dx, {"W": dw, "b": db}, path


# ---------------------------------------------------------------------------------------------
# The conv algorithms against the textbook Conv2d

@pytest.mark.parametrize("shape,c_out,k", MATCH_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_matches_textbook(conv, shape, c_out, k, input_grad, workers, rng, monkeypatch):
    """Every algorithm's forward and backward (with dx, or dW and db alone) equal to the textbook
    Conv2d's in float64, with the path that ran checked: no case silently falls back to another."""
    multiplied_first = []
    original = gemm.multiply_then_shift
    monkeypatch.setattr(gemm, "multiply_then_shift", lambda *a, **kw: multiplied_first.append(1) or original(*a, **kw))
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    out, dx, grads = textbook_conv((shape[-1], c_out, k), x, dout, input_grad)
    out_fast, dx_fast, grads_fast, path = fast_conv(conv, (shape[-1], c_out, k), x, dout, input_grad)
    assert path == expected_path(conv, x, make_conv(shape[-1], c_out, k).params["W"])
    assert bool(multiplied_first) == (path == "gemm" and gemm.multiplies_first(shape[-1], c_out, k))
    tol = 1e-12 if path == "gemm" else 1e-11  # Winograd's transforms round a little more
    np.testing.assert_allclose(out_fast, out, rtol=tol, atol=tol)
    assert (dx_fast is None) == (not input_grad)
    if input_grad:
        np.testing.assert_allclose(dx_fast, dx, rtol=tol, atol=tol)
    for name in ("W", "b"):
        assert grads_fast[name].shape == grads[name].shape
        np.testing.assert_allclose(grads_fast[name], grads[name], rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,c_out,k", [((2, 5, 7, 3), 4, 3), ((2, 4, 8, 16), 16, 3), ((2, 5, 4, 8), 2, 3)])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_relu_epilogue_and_inference_forward_match_textbook(conv, shape, c_out, k, workers, rng):
    """`relu` gives max(conv, 0) from the same pass; `inference` (nothing kept for a backward)
    the same numbers."""
    layer = make_conv(shape[-1], c_out, k)
    x = rng.standard_normal(shape)
    expected = layer.forward(x)
    w, b = layer.params["W"], layer.params["b"]
    path = fast.conv2d_path(x, w, conv)
    tol = 1e-12 if path == "gemm" else 1e-11
    for relu in (False, True):
        out, _ = fast.conv2d_forward(x, w, b, path, relu=relu, inference=True)
        np.testing.assert_allclose(out, np.maximum(expected, 0) if relu else expected, rtol=tol, atol=tol)


def test_conv_path_rejects_unknown_algorithms(rng):
    x, w = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((3, 3, 2, 2))
    for name in ("im2col", "winogard"):  # the textbook is no fast-engine algorithm
        with pytest.raises(ValueError):
            fast.conv2d_path(x, w, name)
    with pytest.raises(ValueError):
        fast.conv2d_forward(x, w, np.zeros(2), "im2col")


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (2, 4, 6, 3), (1, 8, 8, 3)])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_results_survive_other_calls(conv, shape, workers, rng):
    """Outputs, caches and gradients belong to their call, not to scratch space that the next
    conv of the same shape overwrites: interleaved calls give the same numbers as lone ones."""
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    dout_a, dout_b = rng.standard_normal(shape), rng.standard_normal(shape)
    w_a, b_a = make_conv(3, 3, 3, seed=0).params.values()
    w_b, b_b = make_conv(3, 3, 3, seed=5).params.values()
    path = fast.conv2d_path(x, w_a, conv)
    out, cache = fast.conv2d_forward(x, w_a, b_a, path)
    out_lone = out.copy()
    dx_lone, dw_lone, db_lone = (g.copy() for g in fast.conv2d_backward(dout_a.copy(), w_a, cache))

    out_a, cache_a = fast.conv2d_forward(x, w_a, b_a, path)
    _, cache_b = fast.conv2d_forward(y, w_b, b_b, path)
    dx_a, dw_a, db_a = fast.conv2d_backward(dout_a.copy(), w_a, cache_a)
    fast.conv2d_backward(dout_b.copy(), w_b, cache_b)
    assert cache_a[0] == expected_path(conv, x, w_a)
    np.testing.assert_array_equal(out_a, out_lone)
    np.testing.assert_array_equal(dx_a, dx_lone)
    np.testing.assert_array_equal(dw_a, dw_lone)
    np.testing.assert_array_equal(db_a, db_lone)


@pytest.mark.parametrize("conv", CONVS)
def test_conv_backward_leaves_dout_and_x_alone(conv, workers, rng):
    x, dout = rng.standard_normal((2, 4, 6, 3)), rng.standard_normal((2, 4, 6, 4))
    x_before, dout_before = x.copy(), dout.copy()
    w, b = make_conv(3, 4, 3).params.values()
    _, cache = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w, conv))
    fast.conv2d_backward(dout, w, cache)
    np.testing.assert_array_equal(dout, dout_before)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("low_shape,skip_channels,c_out,k", [
    ((2, 3, 4, 6), 4, 2, 3),    # upsampled + skip, few outputs: channels-first products
    ((1, 2, 5, 20), 12, 8, 3),  # ... F >= 8: channels-last products
    ((9, 4, 2, 8), 3, 2, 3),    # batch in pieces
    ((1, 3, 3, 8), 2, 2, 5),    # 5x5 kernel
])
def test_multiply_then_shift_takes_upsampled_products_at_low_resolution(low_shape, skip_channels, c_out, k,
                                                                        workers, rng):
    """conv(concat(upsample2x(low), skip)) with low's products taken at low's size and upsampled."""
    low = rng.standard_normal(low_shape)
    N, h, w, C_low = low_shape
    skip = rng.standard_normal((N, 2 * h, 2 * w, skip_channels))
    conv = make_conv(C_low + skip_channels, c_out, k)
    joined = np.concatenate([Upsample2d().forward(low), skip], axis=-1)  # Concat's order: upsampled first
    expected = conv.forward(joined)  # the textbook
    got = gemm.multiply_then_shift(skip, conv.params["W"], conv.params["b"], upsampled=low)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", CONVS)
def test_conv_float32(conv, rng):
    """float32 in, float32 out, close to the float64 textbook numbers."""
    x, dout = rng.standard_normal((2, 6, 8, 16)), rng.standard_normal((2, 6, 8, 16))
    out, dx, grads = textbook_conv((16, 16, 3), x, dout)
    out32, dx32, grads32, _ = fast_conv(conv, (16, 16, 3), x, dout, dtype=np.float32)
    assert out32.dtype == dx32.dtype == grads32["W"].dtype == grads32["b"].dtype == np.float32
    np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx32, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads32["W"], grads["W"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grads32["b"], grads["b"], rtol=1e-4, atol=1e-3)


def test_padding_buffers_do_not_leak_between_paddings(rng):
    """p=1 on a 5x7 image and p=2 on a 3x5 one pad to the same 7x9 scratch shape: the second
    must still see zeros in its border."""
    x = rng.standard_normal((1, 3, 5, 2))
    reference = make_conv(2, 2, 5, seed=3).forward(x)  # the textbook
    first = make_conv(2, 2, 3)
    fast.conv2d_forward(rng.standard_normal((1, 5, 7, 2)) + 10.0, first.params["W"], first.params["b"], "gemm")
    second = make_conv(2, 2, 5, seed=3)
    out, _ = fast.conv2d_forward(x, second.params["W"], second.params["b"], "gemm")
    np.testing.assert_allclose(out, reference, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The worker pool

def test_split_covers_the_range_in_order():
    for n, pieces in [(10, 3), (2, 8), (7, 7), (1, 4)]:
        parts = parallel.split(n, pieces)
        assert len(parts) == min(n, pieces)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


@pytest.mark.parametrize("N,rows,per_row,target", [(32, 8, 8, 455), (16, 32, 32, 4096), (1, 30, 64, 256),
                                                    (3, 16, 16, 100), (7, 5, 5, 10)])
def test_pieces_cover_the_work_in_a_multiple_of_the_workers(N, rows, per_row, target, use_workers):
    """Every (image, row) exactly once; as many pieces as asked for by `target`, at least two per
    worker, rounded up to a multiple of the workers where the images allow (none waits alone)."""
    use_workers(2)
    like = np.empty(1, dtype=np.float32)
    work = parallel.pieces(N, rows, per_row, like, target=target)
    covered = np.zeros((N, rows), dtype=int)
    for n, y in work:
        covered[n, y] += 1
    assert (covered == 1).all()
    want = max(4, -(-N * rows * per_row // target))
    rounded = -(-want // 2) * 2
    assert len(work) >= min(N, rounded)
    if N >= rounded:  # enough whole images: exactly that many pieces, a multiple of the workers
        assert len(work) == rounded


def test_run_calls_every_task_once(workers):
    seen = np.zeros(25, dtype=int)

    def task(i: int) -> None:
        seen[i] += 1

    parallel.run(task, 25)
    assert np.all(seen == 1)


def spy_conv_paths(monkeypatch, conv: str) -> tuple[list, list]:
    """Lists that fill as fast.Network runs under `conv`: (path taken, expected_path) of every conv
    it hands to fast.conv2d_forward, and every way upsampled_conv_path names (None: upsample,
    then conv)."""
    convs, upsampled_ways = [], []
    conv2d_forward, upsampled_conv_path = network.conv2d_forward, network.upsampled_conv_path

    def forward_spy(x, w, b, path, **kwargs):
        convs.append((path, expected_path(conv, x, w)))  # "auto" asks about the workers: at the time
        return conv2d_forward(x, w, b, path, **kwargs)

    def way_spy(*args, **kwargs):
        upsampled_ways.append(upsampled_conv_path(*args, **kwargs))
        return upsampled_ways[-1]

    monkeypatch.setattr(network, "conv2d_forward", forward_spy)
    monkeypatch.setattr(network, "upsampled_conv_path", way_spy)
    return convs, upsampled_ways


@pytest.mark.parametrize("conv", CONVS)
def test_network_step_same_with_one_worker_or_several(conv, rng, use_workers, monkeypatch):
    """A training step's output, gradients and updated weights do not depend on how the work
    is split (up to rounding: the per-worker partial sums add in another order)."""
    lightness = rng.uniform(-1, 1, (3, 8, 8, 1))
    d_ab = rng.standard_normal((3, 8, 8, 2))
    convs, _ = spy_conv_paths(monkeypatch, conv)
    results = []
    for threads in (1, 3):
        use_workers(threads)
        model = ColorNet((4, 16, 16), seed=2, dtype=np.float64, arch="seed").train()
        with engine.use_conv(conv):
            net = engine.network(model)
            optimizer = Adam(model.param_layers, lr=1e-2, map_tasks=engine.map_tasks())
        ab = net.forward(lightness)
        net.backward(d_ab)
        grads = [layer.grads[name].copy() for layer in model.param_layers for name in ("W", "b")]
        optimizer.step()
        weights = [layer.params["W"].copy() for layer in model.param_layers]
        results.append((ab, grads, weights))
    assert convs and all(path == expected for path, expected in convs)
    if conv != "auto":  # every conv of the network by the algorithm asked for, where it fits
        assert len(convs) == 2 * len(model.param_layers)
        assert conv in {path for path, _ in convs}
    (ab_one, grads_one, weights_one), (ab_several, grads_several, weights_several) = results
    np.testing.assert_allclose(ab_one, ab_several, rtol=1e-12, atol=1e-13)
    for one, several in zip(grads_one, grads_several):
        np.testing.assert_allclose(one, several, rtol=1e-12, atol=1e-13)
    # Adam's first step is lr * g / (|g| + eps) (about lr = 1e-2 for every weight): rounding of up to
    # 1e-13 in a near-zero g (as above) moves it by up to lr * 1e-13 / eps = 1e-7.
    for one, several in zip(weights_one, weights_several):
        np.testing.assert_allclose(one, several, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Whole networks: engine.network(model) against the textbook model.forward / backward

def twin_models(arch: str, widths: tuple, seed: int = 2, class_bins: int = 0) -> tuple:
    """Two equal float64 models, one for the textbook and one for the engine (each keeps its own
    BatchNorm statistics), with non-zero biases, random BatchNorm scales and shifts and running
    statistics away from their start, so every term counts."""
    models = []
    for _ in range(2):
        model = ColorNet(widths, seed=seed, dtype=np.float64, arch=arch, class_bins=class_bins)
        r = np.random.default_rng(seed + 1)
        for layer in model.param_layers:
            if "b" in layer.params:
                layer.params["b"] = r.standard_normal(layer.params["b"].shape) * 0.1
            if isinstance(layer, BatchNorm2d):
                C = layer.params["gamma"].shape
                layer.params["gamma"] = r.uniform(0.5, 1.5, C)
                layer.params["beta"] = r.standard_normal(C) * 0.1
                layer.buffers["running_mean"] = r.standard_normal(C) * 0.1
                layer.buffers["running_var"] = r.uniform(0.5, 2, C)
        models.append(model)
    return tuple(models)


def assert_close(got, expected, what: str, tol: float = 1e-10) -> None:
    """Equal up to float64 rounding, relative to the array's scale."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * float(np.abs(expected).max()), err_msg=what)


def assert_same_state(model, textbook, what: str) -> None:
    """Every gradient and every BatchNorm running statistic of `model` equal to the textbook's."""
    for i, (layer, reference) in enumerate(zip(model.layers, textbook.layers)):
        for name in reference.params:
            if reference.grads[name] is not None:
                assert_close(layer.grads[name], reference.grads[name], f"{what}: layer {i} d{name}")
        for name, buffer in getattr(reference, "buffers", {}).items():
            assert_close(layer.buffers[name], buffer, f"{what}: layer {i} {name}", tol=1e-12)


NETWORK_CASES = [
    ("seed", (4, 16, 16), (3, 8, 8, 1), 0),     # thin first level, batch in pieces
    ("unet", (4, 16, 16), (3, 8, 8, 1), 0),
    ("unet", (16, 16, 32), (2, 16, 12, 1), 0),  # channels enough for Winograd under "auto"; 16x12, 8x6, 4x3
    ("seed", (16, 32), (1, 12, 20, 1), 0),      # one image in bands of rows; 12x20, 6x10
    ("unet", (3,), (2, 5, 7, 1), 0),            # no pooling: one block and the head, odd sizes
    ("unet", (16, 16, 32), (2, 16, 12, 1), 9),  # a class head beside the a*b* head
    ("seed", (4, 16), (1, 6, 10, 1), 5),
]


@pytest.mark.parametrize("arch,widths,shape,class_bins", NETWORK_CASES)
@pytest.mark.parametrize("conv", CONVS)
def test_network_matches_the_textbook_model(conv, arch, widths, shape, class_bins, workers, rng, monkeypatch):
    """fast.Network against ColorNet's own forward and backward: outputs, every gradient and
    BatchNorm's running statistics over two training steps, then inference (BatchNorm folded
    into the conv under the engine) with the running statistics left alone."""
    textbook, model = twin_models(arch, widths, class_bins=class_bins)
    with engine.use_conv(conv):
        net = engine.network(model)
    assert isinstance(net, fast.Network) and net.model is model
    convs, upsampled_ways = spy_conv_paths(monkeypatch, conv)
    d_ab = rng.standard_normal(shape[:3] + (2 + class_bins,))
    for step in range(2):  # the second step's running statistics build on the first's
        lightness = rng.uniform(-1, 1, shape)
        expected = textbook.train().forward(lightness)
        textbook.backward(d_ab)
        got = net.train().forward(lightness)
        assert net.training and model.training
        d_before = d_ab.copy()
        net.backward(d_ab)
        np.testing.assert_array_equal(d_ab, d_before)  # backward leaves its input alone
        assert_close(got, expected, f"training step {step}: output")
        assert_same_state(model, textbook, f"training step {step}")
    assert all(path == expected for path, expected in convs)
    if conv == "auto" and len(widths) > 1:  # the decoder's convs taken at the low resolution
        assert upsampled_ways and set(upsampled_ways) <= {"phases", "winograd4", "phases+skip"}
    elif conv != "auto":  # upsample (and join), then the conv asked for, in training
        assert set(upsampled_ways) <= {None} and {path for path, _ in convs} <= {conv, "gemm"}

    textbook.eval()
    net.eval()
    assert not net.training and not model.training
    for batch in (shape[0], 1):
        lightness = rng.uniform(-1, 1, (batch,) + shape[1:])
        assert_close(net.forward(lightness), textbook.forward(lightness), f"inference, batch {batch}")
    assert_same_state(model, textbook, "after inference")  # the running statistics did not move
    with pytest.raises(RuntimeError, match="training mode"):
        net.backward(d_ab)


def test_network_backward_needs_its_own_training_forward(rng):
    """A Network's caches are its own records: backward without a forward in training refuses,
    even when the model itself has run a forward in training."""
    model = ColorNet((4, 8), seed=1, dtype=np.float64, arch="unet")
    net = fast.Network(model, "gemm")
    lightness = rng.uniform(-1, 1, (2, 4, 4, 1))
    model.train().forward(lightness)
    with pytest.raises(RuntimeError, match="training mode"):
        net.backward(np.zeros((2, 4, 4, 2)))
    net.train().forward(lightness)
    assert net.records
    net.backward(np.zeros((2, 4, 4, 2)))
    assert net.records == []  # taken back in reverse order, all of them


@pytest.mark.parametrize("arch", ["seed", "unet"])
def test_network_refuses_sizes_the_model_refuses(arch, rng):
    net = fast.Network(ColorNet((2, 3, 4), arch=arch), "auto")
    with pytest.raises(ValueError, match="downsampling factor"):
        net.forward(rng.uniform(-1, 1, (1, 6, 8, 1)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The engine seam: nanocolor/engine.py

def test_conv_knob_rejects_unknown_names_and_restores():
    assert engine.get_conv() == "auto" and engine.uses_fast()
    assert set(engine.CONVS) == set(fast.CONVS) | {"im2col"}
    with pytest.raises(ValueError):
        engine.set_conv("winogard")
    assert engine.get_conv() == "auto"
    with engine.use_conv("im2col"):
        assert engine.get_conv() == "im2col" and not engine.uses_fast()
        with engine.use_conv("winograd4"):
            assert engine.get_conv() == "winograd4" and engine.uses_fast()
        assert engine.get_conv() == "im2col"
    assert engine.get_conv() == "auto" and engine.uses_fast()
    with pytest.raises(KeyError):
        with engine.use_conv("gemm"):
            raise KeyError("restored even when the block fails")
    assert engine.get_conv() == "auto"


@pytest.mark.parametrize("conv", engine.CONVS)
def test_network_is_the_model_under_the_textbook_and_a_fast_network_otherwise(conv):
    model = ColorNet((2, 3), arch="unet")
    with engine.use_conv(conv):
        net = engine.network(model)
        tasks = engine.map_tasks()
    if conv == "im2col":  # the tasks in turn, on the calling thread
        assert net is model
        ran = []
        tasks(lambda i: ran.append((i, threading.get_ident())), 4)
        assert ran == [(i, threading.get_ident()) for i in range(4)]
    else:
        assert isinstance(net, fast.Network) and net.model is model and net.conv == conv
        assert tasks is parallel.run


def test_a_textbook_training_step_never_touches_the_worker_pool(rng, monkeypatch):
    """Under "im2col" a training step (forward, backward, Adam with engine.map_tasks()) runs on
    the calling thread alone; the same step under the fast engine does ask for the workers."""
    def no_pool(*args, **kwargs):
        raise AssertionError("the CPU worker pool was asked for")
    for name in ("run", "set_workers", "workers"):
        monkeypatch.setattr(parallel, name, no_pool)
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    ab = rng.uniform(-0.3, 0.3, (2, 8, 8, 2)).astype(np.float32)
    for arch in ("seed", "unet"):
        model = ColorNet((4, 16), seed=1, arch=arch)
        before = [p.copy() for layer in model.param_layers for p in layer.params.values()]
        with engine.use_conv("im2col"):
            net = engine.network(model)
            optimizer = Adam(model.param_layers, lr=1e-2, map_tasks=engine.map_tasks())
        loss = train_step(net, MSELoss(), optimizer, lightness, ab)
        assert np.isfinite(loss)
        after = [p for layer in model.param_layers for p in layer.params.values()]
        assert all(not np.array_equal(a, b) for a, b in zip(after, before))  # every parameter took the step
        with engine.use_conv("auto"):  # the check itself: the fast engine is caught
            fast_net = engine.network(model)
        with pytest.raises(AssertionError, match="worker pool"):
            train_step(fast_net, MSELoss(), optimizer, lightness, ab)


# ---------------------------------------------------------------------------------------------
# Max-pool, upsample, ReLU: resample.py against the textbook layers

def loop_maxpool(x: np.ndarray) -> tuple:
    """Reference 2x2 max-pool by loops; backward of ones routes to the first maximum in
    row-major window order. Returns (out, mask of receivers)."""
    N, H, W, C = x.shape
    out = np.zeros((N, H // 2, W // 2, C))
    mask = np.zeros(x.shape, dtype=bool)
    for n in range(N):
        for y in range(H // 2):
            for xx in range(W // 2):
                for c in range(C):
                    window = x[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c].ravel()
                    first = int(np.argmax(window))
                    out[n, y, xx, c] = window[first]
                    mask[n, 2 * y + first // 2, 2 * xx + first % 2, c] = True
    return out, mask


def textbook_pool(x, dout) -> tuple:
    pool = MaxPool2d()
    return pool.forward(x), pool.backward(dout)


def fast_pool(x, dout) -> tuple:
    out, cache = maxpool2d_forward(x)
    return out, maxpool2d_backward(dout, cache)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 9, 7, 2), (3, 2, 2, 1), (2, 5, 8, 4)])
@pytest.mark.parametrize("pool", [textbook_pool, fast_pool], ids=["textbook", "fast"])
def test_maxpool_matches_loop_reference_with_many_ties(shape, pool, workers, rng):
    x = rng.integers(0, 3, shape).astype(np.float64)  # three values: ties in most windows
    x = np.maximum(x - 1, 0)                         # and zeros as after a ReLU
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    x_before, dout_before = x.copy(), dout.copy()
    out, dx = pool(x, dout)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dout, dout_before)
    expected_out, mask = loop_maxpool(x)
    np.testing.assert_array_equal(out, expected_out)
    # Each receiver gets its window's gradient; every other pixel (odd last rows too) gets zero.
    expected_dx = np.zeros_like(x)
    N, H2, W2, C = out.shape
    for n in range(N):
        for y in range(H2):
            for xx in range(W2):
                for c in range(C):
                    block = mask[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c]
                    expected_dx[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c][block] = dout[n, y, xx, c]
    np.testing.assert_array_equal(dx, expected_dx)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (3, 2, 2, 1), (1, 9, 7, 2), (2, 5, 8, 4)])
def test_fast_maxpool_equals_the_textbook_layer(shape, workers, rng):
    """Distinct random values, odd sizes included: the same output and gradient, bit for bit."""
    x = rng.standard_normal(shape)
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    out, dx = textbook_pool(x, dout)
    out_fast, dx_fast = fast_pool(x, dout)
    np.testing.assert_array_equal(out_fast, out)
    np.testing.assert_array_equal(dx_fast, dx)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 9, 7, 2), (3, 2, 2, 1), (2, 8, 4, 5)])
def test_maxpool_backward_with_the_relu_mask_at_the_pooled_size(shape, workers, rng):
    """maxpool2d_backward(relu=True) after pooling a ReLU's output = the textbook ReLU's backward
    of the textbook pool's, where windows hold ties and all-zero windows (whose gradient the ReLU
    stops)."""
    x = rng.integers(-2, 3, shape).astype(np.float64)
    relu, pool = ReLU(), MaxPool2d()
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    out = pool.forward(relu.forward(x))
    assert (out == 0).any() and (out > 0).any()
    expected = relu.backward(pool.backward(dout))
    dout_before = dout.copy()
    fast_out, cache = maxpool2d_forward(np.maximum(x, 0))
    np.testing.assert_array_equal(fast_out, out)
    np.testing.assert_array_equal(maxpool2d_backward(dout, cache, relu=True), expected)
    np.testing.assert_array_equal(dout, dout_before)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (5, 8, 2, 2), (1, 2, 4, 1)])
def test_maxpool_backward_plus_another_gradient(shape, workers, rng):
    """maxpool2d_backward(plus=...) = the textbook pool's backward + the skip's gradient, in one
    pass, with `plus` left as it was; refused on odd sizes."""
    x = rng.integers(0, 3, shape).astype(np.float64)  # ties
    pool = MaxPool2d()
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    plus = rng.standard_normal(shape)
    plus_before = plus.copy()
    pool.forward(x)
    expected = pool.backward(dout) + plus
    _, cache = maxpool2d_forward(x)
    np.testing.assert_array_equal(maxpool2d_backward(dout, cache, plus=plus), expected)
    np.testing.assert_array_equal(plus, plus_before)
    odd = rng.standard_normal((shape[0], shape[1] + 1, shape[2], shape[3]))
    _, cache = maxpool2d_forward(odd)
    with pytest.raises(ValueError, match="even"):
        maxpool2d_backward(dout, cache, plus=rng.standard_normal(odd.shape))


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 5, 3, 2), (1, 1, 1, 4), (3, 16, 9, 2)])
def test_upsample_matches_the_textbook_layer(shape, workers, rng):
    N, H, W, C = shape
    x = rng.standard_normal(shape)
    dout = rng.standard_normal((N, 2 * H, 2 * W, C))
    dout_before = dout.copy()
    up = Upsample2d()
    out, dx = up.forward(x), up.backward(dout)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
    np.testing.assert_allclose(dx, dout.reshape(N, H, 2, W, 2, C).sum(axis=(2, 4)), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(upsample2d_forward(x), out)
    np.testing.assert_allclose(upsample2d_backward(dout), dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(dout, dout_before)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 2, 3), (4, 6)])
def test_relu_backward_matches_the_textbook_layer(shape, workers, rng):
    x = rng.standard_normal(shape)
    x[..., 0] = 0.0  # a zero output passes nothing, as in the textbook
    relu = ReLU()
    dout = rng.standard_normal(x.shape)
    dout_before = dout.copy()
    out, dx = relu.forward(x), relu.backward(dout)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0))
    np.testing.assert_array_equal(relu_backward(dout, out), dx)
    np.testing.assert_array_equal(dout, dout_before)


# ---------------------------------------------------------------------------------------------
# Adam

class _Holder:
    def __init__(self, params: dict):
        self.params = params
        self.grads = {name: None for name in params}


@pytest.mark.parametrize("spread", [False, True], ids=["in_turn", "map_tasks"])
def test_adam_matches_textbook_update(spread, workers, rng):
    """Adam's in-place update against Kingma & Ba's algorithm, in turn (the default) or with the
    per-parameter updates spread over the CPU workers (map_tasks=parallel.run)."""
    layers = [_Holder({"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}),
              _Holder({"W": rng.standard_normal((2, 2, 5))})]
    spread_calls = []

    def over_workers(task, n):
        spread_calls.append(n)
        parallel.run(task, n)
    lr, betas, eps, steps = 0.05, (0.8, 0.95), 1e-6, 4
    grads = [{name: [rng.standard_normal(p.shape) for _ in range(steps)] for name, p in layer.params.items()}
             for layer in layers]
    expected = [{name: adam_reference(p.copy(), grads[i][name], lr, *betas, eps) for name, p in layer.params.items()}
                for i, layer in enumerate(layers)]
    adam = Adam(layers, lr=lr, betas=betas, eps=eps, map_tasks=over_workers if spread else None)
    for t in range(steps):
        for i, layer in enumerate(layers):
            for name in layer.params:
                layer.grads[name] = grads[i][name][t]
        adam.step()
        for i, layer in enumerate(layers):
            for name, p in layer.params.items():
                np.testing.assert_allclose(p, expected[i][name][t], rtol=1e-12, atol=1e-12)
    assert spread_calls == ([3] * steps if spread else [])  # one task per parameter array, every step


def test_adam_updates_parameters_in_place_and_keeps_grads(rng):
    layer = _Holder({"W": rng.standard_normal((4, 3))})
    weights = layer.params["W"]
    layer.grads["W"] = g = rng.standard_normal((4, 3))
    g_before = g.copy()
    adam = Adam([layer], lr=0.1)
    adam.step()
    assert layer.params["W"] is weights        # the layer's array itself moved
    np.testing.assert_array_equal(g, g_before)  # the gradient is left as it was
    state = adam.state_dict()
    fresh = Adam([_Holder({"W": weights.copy()})], lr=0.1)
    fresh.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    assert fresh.t == 1
    np.testing.assert_array_equal(fresh.m[0], adam.m[0])
    np.testing.assert_array_equal(fresh.v[0], adam.v[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_wait_on_parent_workers(use_workers):
    """Threads do not survive fork: a child must not hand tasks to the parent's pool.

    The child first checks that no pool thread it could hand work to is dead (that is what
    would make it hang), then runs tasks on its own pool. The parent blocks on waitpid, with no
    deadline of its own: an alarm in the child turns a hang into a failure after 120 s.
    """
    use_workers(2)
    parallel.run(lambda i: None, 4)  # the parent's pool threads exist now
    pid = os.fork()
    if pid == 0:  # child: exit 0 once the work is done on live threads
        code = 1
        try:
            signal.alarm(120)
            pool = parallel._state["pool"]
            if pool is not None and not all(helper.thread.is_alive() for helper in pool.helpers):
                os._exit(3)  # would hand tasks to the parent's threads, which the child lacks
            done, ran_on = [], set()
            parallel.run(lambda i: (done.append(i), ran_on.add(threading.get_ident())), 4)
            alive = {t.ident for t in threading.enumerate()}
            code = 0 if sorted(done) == [0, 1, 2, 3] and ran_on <= alive else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), "the forked child hung waiting for the parent's worker threads"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child exit status {os.WEXITSTATUS(status)}"


# Allocates 80 MB before and after keep_large_arrays_in_heap(), printing how many bytes glibc
# holds in mmap()ed blocks after each (mallinfo2().hblkhd).
_HEAP_PROBE = """
import ctypes, numpy as np
from nanocolor.fast import parallel
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
mapped = lambda: libc.mallinfo2().hblkhd
base = mapped()
a = np.ones(20_000_000, dtype=np.float32)
before = mapped() - base
del a
took = parallel.keep_large_arrays_in_heap()
base = mapped()
b = np.ones(20_000_000, dtype=np.float32)
print(before, mapped() - base, took)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_arrays_are_kept_in_the_heap():
    """An 80 MB array is a fresh mmap() by default; after keep_large_arrays_in_heap() it is not."""
    result = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=60)
    if "mallinfo2" in result.stderr:
        pytest.skip("glibc older than 2.33: no mallinfo2")
    assert result.returncode == 0, result.stderr
    before, after, took = result.stdout.split()
    assert took == "True"
    assert int(before) >= 80_000_000  # the default: a mapping of its own
    assert int(after) == 0            # now served from the heap


# ---------------------------------------------------------------------------------------------
# Weights prepared once for inference

def test_prepared_is_made_once_per_set_of_values(rng):
    from nanocolor.fast import workspace
    w = rng.standard_normal((3, 3, 4, 5))
    calls = []
    make = lambda a: calls.append(1) or a * 2
    first = workspace.prepared("test", (w,), make)
    assert workspace.prepared("test", (w,), make) is first and len(calls) == 1
    w[1, 2, 3, 4] += 1  # changed in place: noticed, made again
    np.testing.assert_array_equal(workspace.prepared("test", (w,), make), w * 2)
    assert len(calls) == 2
    other = w.copy()  # equal values elsewhere: its own entry, the same numbers
    np.testing.assert_array_equal(workspace.prepared("test", (other,), make), w * 2)
    arrays = [np.full(3, float(i)) for i in range(workspace.PREPARED_ENTRIES + 5)]  # alive: each its own key
    for a in arrays:  # the oldest entries go
        workspace.prepared("test", (a,), make)
    assert len(workspace._prepared) == workspace.PREPARED_ENTRIES


@pytest.mark.parametrize("arch", ["seed", "unet"])
def test_inference_after_training_steps_uses_the_new_weights(arch, rng):
    """Eval, a training step (Adam changes the weights in place), eval again: each time the
    textbook network's output, never transforms prepared from the old weights."""
    model = ColorNet((16, 16, 32), arch=arch, seed=2, dtype=np.float64)
    lightness = rng.uniform(-1, 1, (2, 16, 16, 1))
    with engine.use_conv("auto"):
        net = engine.network(model)
    assert net is not model
    optimizer = Adam(model.param_layers, lr=1e-2)
    for _ in range(2):
        expected = model.eval().forward(lightness)  # the textbook
        net.eval()
        np.testing.assert_allclose(net.forward(lightness), expected, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(net.forward(lightness), expected, rtol=1e-11, atol=1e-12)
        net.train()
        net.backward(net.forward(lightness) - 0.5)
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# Per-channel and ReLU passes over long rows

@pytest.mark.parametrize("shape", [(3, 5, 7, 32), (1, 1, 1, 3), (2, 64, 64, 8), (4, 9, 128)])
def test_per_channel_and_relu_give_numpys_broadcasting(shape, rng):
    """Rows of LONG_ROWS values plus a shorter rest, in place or not, and strided views (which
    fall back to plain broadcasting): the numbers of a * vector, a - vector and max(a, 0)."""
    from nanocolor.fast.helpers import LONG_ROWS, channel_rows, per_channel, relu_into
    a = rng.standard_normal(shape).astype(np.float32)
    vector = rng.standard_normal(shape[-1]).astype(np.float32)
    row = channel_rows(vector)
    assert row.shape[0] >= LONG_ROWS and row.shape[0] % shape[-1] == 0
    for op in (np.multiply, np.subtract):
        out = np.empty_like(a)
        per_channel(op, a, row, out)
        np.testing.assert_array_equal(out, op(a, vector))
        strided = a[..., ::2, :]
        out = np.empty_like(strided)
        per_channel(op, strided, row, out)
        np.testing.assert_array_equal(out, op(strided, vector))
    b = a.copy()
    per_channel(np.add, b, row, b)
    np.testing.assert_array_equal(b, a + vector)
    relu_into(a, b)
    np.testing.assert_array_equal(b, np.maximum(a, 0))
    untouched = a[..., 1::2, :].copy()
    view = a[..., ::2, :]
    relu_into(view, view)  # in place through a strided view
    assert (view >= 0).all()
    np.testing.assert_array_equal(a[..., 1::2, :], untouched)


@pytest.mark.parametrize("m, n, k", [(9, 4, 5000), (3, 2, 20000), (64, 576, 3000)])
def test_thin_products_in_chunks_add_up_to_the_product(m, n, k, rng, monkeypatch):
    """add_thin_product adds a @ b into acc in chunks of K (with a lower SMALL_PRODUCT: 1024 and
    6144 columns, a last shorter chunk included), or in one call for wide products; a may be a
    transposed view, as the weight gradients pass it."""
    from nanocolor.fast import helpers
    monkeypatch.setattr(helpers, "SMALL_PRODUCT", 1024 * 9 * 4)
    a, b = rng.standard_normal((k, m)).T, rng.standard_normal((k, n))
    acc = rng.standard_normal((m, n))
    expected = acc + a @ b
    helpers.add_thin_product(a, b, acc)
    np.testing.assert_allclose(acc, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b_shape", [(6, 5000), (6, 4, 3001), (4, 6, 7)])
def test_small_matmul_in_column_chunks_is_the_product(b_shape, rng, monkeypatch):
    """small_matmul writes a @ b chunk by chunk of b's columns (here of 1000, with a lower
    SMALL_PRODUCT, a shorter last one included), for a small a that may be a transposed view
    and b a matrix or a stack of them, as Winograd's transforms call it."""
    from nanocolor.fast import helpers
    monkeypatch.setattr(helpers, "SMALL_PRODUCT", 1000 * 6 * b_shape[-2])
    a = rng.standard_normal((b_shape[-2], 6)).T
    b = rng.standard_normal(b_shape)
    out = np.full(b_shape[:-2] + (6, b_shape[-1]), np.nan)
    helpers.small_matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
