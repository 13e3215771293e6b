"""The U-Net's pieces: BatchNorm2d and Concat against central differences (float64), the whole
U-Net end to end, BatchNorm's running statistics, saving them, and weight files written before
the architecture had a name."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import BatchNorm2d, Concat, Conv2d
from nanocolor.model import ColorNet
from nanocolor.serialize import load_npz

TOL = 1e-6
# A weights file written by the format before architectures had a name (config without "arch").
FORMAT1 = REPO / "tests" / "data" / "seed_model_format1.npz"


def batchnorm64(channels: int, rng: np.random.Generator) -> BatchNorm2d:
    bn = BatchNorm2d(channels, dtype=np.float64)
    bn.params["gamma"] = rng.standard_normal(channels)  # away from the identity start
    bn.params["beta"] = rng.standard_normal(channels)
    return bn


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 3), (3, 2, 7, 1), (1, 5, 3, 2)])
def test_batchnorm_gradients(shape, rng):
    bn = batchnorm64(shape[-1], rng)
    x = rng.standard_normal(shape) * 3 + 1
    dout = rng.standard_normal(shape)
    f = lambda: float(np.sum(bn.forward(x) * dout))
    bn.forward(x)
    dout_before = dout.copy()
    dx = bn.backward(dout)
    assert np.array_equal(dout, dout_before)  # backward never changes its input
    grads = {name: g.copy() for name, g in bn.grads.items()}
    if shape[:3] != (1, 1, 1):  # one pixel per channel: x_hat is 0 whatever x is
        assert relative_error(dx, numeric_gradient(f, x)) < TOL
    for name, p in bn.params.items():
        assert relative_error(grads[name], numeric_gradient(f, p)) < TOL, name


def test_batchnorm_normalizes_in_training_and_uses_running_statistics_in_inference(rng):
    bn = BatchNorm2d(3, momentum=0.5, dtype=np.float64)
    x = rng.standard_normal((4, 5, 6, 3)) * np.array([1, 2, 3]) + np.array([-1, 0, 4])
    out = bn.forward(x)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 1, 2)), 1, rtol=1e-4)  # eps = 1e-5 below 1
    rows = x.reshape(-1, 3)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.5 * rows.mean(axis=0))
    np.testing.assert_allclose(bn.buffers["running_var"], 0.5 + 0.5 * rows.var(axis=0, ddof=1))
    bn.training = False
    single = bn.forward(x[:1])  # one photo alone: its output does not depend on the batch
    expected = (x[:1] - bn.buffers["running_mean"]) / np.sqrt(bn.buffers["running_var"] + bn.eps)
    np.testing.assert_allclose(single, expected)
    with pytest.raises(RuntimeError, match="training mode"):
        bn.backward(single)


def test_batchnorm_over_shards_equals_the_whole_batch(rng):
    """Two shards of one batch, each normalized with sums over both (as MPI ranks are), give the
    outputs and input gradients of the whole batch; their parameter gradients add up to its."""
    x, dout = rng.standard_normal((4, 3, 5, 2)), rng.standard_normal((4, 3, 5, 2))
    whole = batchnorm64(2, np.random.default_rng(7))
    out, dx = whole.forward(x), whole.backward(dout)
    # The whole batch's sums, in the order a shard asks for them: pixel sum, squared deviations,
    # then (d, d * x_hat) in backward. A stand-in for the Allreduce hands them out.
    rows, d_rows = x.reshape(-1, 2), dout.reshape(-1, 2)
    mean = rows.mean(axis=0)
    sq = ((rows - mean) ** 2).sum(axis=0)
    x_hat = (rows - mean) / np.sqrt(sq / rows.shape[0] + 1e-5)
    sums_in_order = [rows.sum(axis=0)[None], sq[None], np.stack([d_rows.sum(axis=0), (d_rows * x_hat).sum(axis=0)])]
    handed_out: list = []
    shards = [batchnorm64(2, np.random.default_rng(7)) for _ in range(2)]
    for bn in shards:
        bn.shards, bn.sum_over_batch = 2, lambda partial: handed_out.pop(0)
    halves = [slice(0, 2), slice(2, 4)]
    outs, dxs = [], []
    for bn, half in zip(shards, halves):
        handed_out[:] = sums_in_order
        outs.append(bn.forward(x[half]))
        dxs.append(bn.backward(dout[half]))
    np.testing.assert_allclose(np.concatenate(outs), out, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(dxs), dx, atol=1e-12)
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(shards[0].grads[name] + shards[1].grads[name], whole.grads[name], atol=1e-12)


def test_concat_gradients(rng):
    a, b = rng.standard_normal((2, 3, 5, 2)), rng.standard_normal((2, 3, 5, 3))
    cat = Concat()
    out = cat.forward(a, b)
    assert out.shape == (2, 3, 5, 5)
    dout = rng.standard_normal(out.shape)
    da, db = cat.backward(dout)
    f = lambda: float(np.sum(cat.forward(a, b) * dout))
    assert relative_error(da, numeric_gradient(f, a)) < TOL
    assert relative_error(db, numeric_gradient(f, b)) < TOL


@pytest.mark.parametrize("widths, shape, arch, class_bins", [((3, 4, 5), (2, 8, 12, 1), "unet", 0),
                                                             ((2, 3), (1, 6, 2, 1), "unet", 0),
                                                             ((3, 4, 5), (2, 4, 12, 1), "unet", 7),  # a class head
                                                             ((2, 3), (1, 6, 2, 1), "seed", 5)])
def test_unet_end_to_end_gradients(widths, shape, arch, class_bins, rng):
    model = ColorNet(widths, seed=2, dtype=np.float64, arch=arch, class_bins=class_bins).train()
    for layer in model.layers:  # random BatchNorm scale and shift: every term of its backward matters
        if isinstance(layer, BatchNorm2d):
            layer.params["gamma"] = rng.uniform(0.5, 1.5, layer.params["gamma"].shape)
            layer.params["beta"] = rng.standard_normal(layer.params["beta"].shape) * 0.1
    lightness = rng.uniform(-1, 1, shape)
    d_ab = rng.standard_normal(model.forward(lightness).shape)
    f = lambda: float(np.sum(model.forward(lightness) * d_ab))
    model.forward(lightness)
    model.backward(d_ab)
    checked = 0
    for i, layer in enumerate(model.layers):
        for name, p in layer.params.items():
            err = relative_error(layer.grads[name], numeric_gradient(f, p))
            assert err < TOL, (i, type(layer).__name__, name, err)
            checked += 1
    assert checked == sum(len(layer.params) for layer in model.layers)


def test_unet_shapes_and_skips():
    model = ColorNet((4, 8, 16), arch="unet")
    names = [type(layer).__name__ for layer in model.layers]
    assert names.count("BatchNorm2d") == 5 and names.count("Concat") == 2
    out = model.forward(np.zeros((3, 16, 24, 1), dtype=np.float32))
    assert out.shape == (3, 16, 24, 2) and out.dtype == np.float32
    # decoder convs read their own upsampled features plus the encoder's: 2 * width channels
    convs = [layer for layer in model.layers if isinstance(layer, Conv2d)]
    assert [c.c_in for c in convs] == [1, 4, 8, 16, 16, 8]
    # a conv feeding BatchNorm has no bias (BatchNorm would subtract it again); the head has one
    assert ["b" in c.params for c in convs] == [False] * 5 + [True]


def test_unet_saves_and_restores_running_statistics(tmp_path, rng):
    model = ColorNet((4, 8), seed=1, arch="unet").train()
    for _ in range(3):  # move the running statistics away from their start
        model.forward(rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32))
    model.eval()
    model.save(tmp_path / "unet.npz", dtype=None)
    loaded = ColorNet.load(tmp_path / "unet.npz")
    assert loaded.config["arch"] == "unet"
    x = rng.uniform(-1, 1, (1, 8, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    stats = [k for k in load_npz(tmp_path / "unet.npz")[0] if k.endswith("running_var")]
    assert len(stats) == 3  # encoder, bottleneck, decoder


def randomized_statistics(model: ColorNet, rng: np.random.Generator) -> ColorNet:
    """Running statistics and shifts away from their start: a copy that drops one shows."""
    for layer in model.layers:
        if isinstance(layer, BatchNorm2d):
            layer.buffers["running_mean"] = rng.standard_normal(layer.buffers["running_mean"].shape)
            layer.buffers["running_var"] = rng.uniform(0.5, 2, layer.buffers["running_var"].shape)
            layer.params["beta"] = rng.standard_normal(layer.params["beta"].shape)
    return model


@pytest.mark.parametrize("widths, width", [((4, 8, 16), 12), ((3, 5), 5)])
def test_a_deepened_unet_computes_what_it_grew_from_then_learns_with_its_new_level(widths, width, rng):
    model = randomized_statistics(ColorNet(widths, seed=1, dtype=np.float64, arch="unet"), rng)
    model.chroma_gain = 1.2
    deep = model.deepened(width, seed=3)
    assert deep.config["widths"] == [*widths, width] and deep.chroma_gain == 1.2
    assert deep.num_params() > model.num_params()
    lightness = rng.uniform(-1, 1, (2, 16, 24, 1))
    np.testing.assert_allclose(deep.forward(lightness), model.forward(lightness), rtol=0, atol=1e-12)
    # The old bottleneck's conv now ends the encoder; the new level's gradient is non-zero.
    deep.train().forward(lightness)
    deep.backward(rng.standard_normal((2, 16, 24, 2)))
    grown = [layer for layer in deep.layers if isinstance(layer, Conv2d) and layer.c_in == 2 * widths[-1]][-1]
    new_part = grown.c_in - widths[-1]  # the concat's first part: the new level's upsampled output
    assert new_part == widths[-1] and np.all(grown.params["W"][:, :, :new_part] == 0)
    assert np.abs(grown.grads["W"][:, :, :new_part]).max() > 0  # the zero weights on the new level will move


def test_only_a_unet_can_grow():
    with pytest.raises(ValueError, match="only a U-Net"):
        ColorNet((4, 8), arch="seed").deepened(8)


def test_init_grows_a_unet_one_level_when_given_one_more_width(tmp_path, rng):
    start = randomized_statistics(ColorNet((4, 8), seed=5, arch="unet"), rng)
    start.save(tmp_path / "start.npz", dtype=np.float32)
    photos = REPO / "data" / "sample"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--init", str(tmp_path / "start.npz"),
                             "--widths", "4,8,6", "--lr", "1e-9", "--data", str(photos), "--limit", "24",
                             "--size", "16", "--epochs", "1", "--batch-size", "4", "--quiet",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    grown = ColorNet.load(tmp_path / "run" / "checkpoint.npz")
    assert grown.config["widths"] == [4, 8, 6]
    # lr 1e-9: the run's parameters are the grown start's, zeros included (running statistics move)
    expected = start.deepened(6).state_arrays()
    for name, a in grown.state_arrays().items():
        if "running" not in name:
            np.testing.assert_allclose(a, expected[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("widths, wider, arch, class_bins", [
    ((4, 8, 16), (5, 8, 21), "unet", 0), ((3, 5), (4, 7), "unet", 7), ((4, 8), (6, 9), "seed", 0), ((4,), (7,), "seed", 0)])
def test_a_widened_net_computes_what_it_grew_from_then_learns_with_its_new_channels(widths, wider, arch,
                                                                                   class_bins, rng):
    model = randomized_statistics(ColorNet(widths, seed=1, dtype=np.float64, arch=arch, class_bins=class_bins), rng)
    model.chroma_gain = 1.2
    wide = model.widened(wider, seed=3)
    assert wide.config == {**model.config, "widths": list(wider)} and wide.chroma_gain == 1.2
    assert wide.num_params() > model.num_params()
    lightness = rng.uniform(-1, 1, (2, 16, 24, 1))
    np.testing.assert_allclose(wide.forward(lightness), model.forward(lightness), rtol=0, atol=1e-12)
    # In training mode too: BatchNorm's batch statistics of the old channels are what they were.
    np.testing.assert_allclose(wide.train().forward(lightness), model.train().forward(lightness), rtol=0, atol=1e-12)
    wide.backward(rng.standard_normal((2, 16, 24, 2 + class_bins)))
    convs = [(old, new) for old, new in zip(model.layers, wide.layers) if isinstance(new, Conv2d)]
    reading_new = [new for old, new in convs if new.c_in > old.c_in]
    assert reading_new  # some conv reads new channels: its weights there start at zero and will move
    for conv in reading_new:
        zero = np.all(conv.params["W"][:, :, :, :] == 0, axis=(0, 1, 3))
        assert zero.sum() == conv.c_in - next(old.c_in for old, new in convs if new is conv)
        assert np.abs(conv.grads["W"][:, :, zero]).max() > 0


def test_a_net_widens_only_to_as_many_levels_each_at_least_as_wide():
    model = ColorNet((4, 8), arch="unet")
    for widths in [(4, 6), (4, 8, 8), (8,)]:
        with pytest.raises(ValueError, match="widened widths"):
            model.widened(widths)


def test_init_widens_a_net_when_given_wider_widths(tmp_path, rng):
    start = randomized_statistics(ColorNet((4, 8), seed=5, arch="unet"), rng)
    start.save(tmp_path / "start.npz", dtype=np.float32)
    photos = REPO / "data" / "sample"
    run = lambda widths, out: subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--init", str(tmp_path / "start.npz"), "--widths", widths,
         "--lr", "1e-9", "--data", str(photos), "--limit", "24", "--size", "16", "--epochs", "1",
         "--batch-size", "4", "--quiet", "--out", str(tmp_path / out)], capture_output=True, text=True, cwd=tmp_path)
    result = run("5,11", "run")
    assert result.returncode == 0, result.stderr
    wide = ColorNet.load(tmp_path / "run" / "checkpoint.npz")
    assert wide.config["widths"] == [5, 11]
    # lr 1e-9: the run's parameters are the widened start's, zeros included (running statistics move)
    expected = start.widened((5, 11)).state_arrays()
    for name, a in wide.state_arrays().items():
        if "running" not in name:
            np.testing.assert_allclose(a, expected[name], atol=1e-6, err_msg=name)
    narrower = run("3,11", "narrower")
    assert narrower.returncode == 2 and "wider widths to widen it" in narrower.stderr
    assert not (tmp_path / "narrower").exists()


def test_a_weights_file_from_before_arch_existed_loads_as_the_seed_autoencoder():
    """A file whose config predates 'arch' loads as the seed autoencoder it was."""
    _, meta = load_npz(FORMAT1)
    assert "arch" not in meta["config"]  # written by the previous format
    model = ColorNet.load(FORMAT1)
    assert model.config["arch"] == "seed" and model.config["widths"] == [4, 8]
    assert [type(layer).__name__ for layer in model.layers][:3] == ["Conv2d", "ReLU", "MaxPool2d"]


def test_init_from_a_file_of_the_previous_format(tmp_path):
    photos = REPO / "data" / "sample"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--init", str(FORMAT1), "--data", str(photos),
                             "--limit", "24", "--size", "16", "--epochs", "1", "--batch-size", "4", "--quiet",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ColorNet.load(tmp_path / "run" / "model.npz").config == ColorNet.load(FORMAT1).config


def test_chroma_gain_is_saved_and_scales_the_colors(tmp_path):
    from nanocolor.infer import predict_ab
    model = ColorNet((4, 8), seed=3, arch="unet")
    lightness = np.linspace(0, 100, 16 * 24, dtype=np.float32).reshape(16, 24)
    plain = predict_ab(model, lightness, work_size=24)
    model.chroma_gain = 1.5
    model.save(tmp_path / "gain.npz", dtype=None)  # float32: the same weights
    loaded = ColorNet.load(tmp_path / "gain.npz")
    assert loaded.chroma_gain == 1.5
    np.testing.assert_allclose(predict_ab(loaded, lightness, work_size=24), 1.5 * plain, rtol=1e-5, atol=1e-5)
    assert ColorNet.load(FORMAT1).chroma_gain == 1.0  # files without one leave the prediction as it is
