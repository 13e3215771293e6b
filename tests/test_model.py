"""ColorNet's shape rules, parameter count, and saving/loading (incl. every kind of bad file)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nanocolor.model import ColorNet
from nanocolor.serialize import CorruptFileError, load_npz, save_npz


def conv_params(c_in: int, c_out: int, k: int = 3) -> int:
    return k * k * c_in * c_out + c_out


def test_reference_model_parameter_count():
    # 1->64, 64->128, 128->256, 256->512, 512->256, 256->128, 128->64, 64->2, all 3x3 with bias
    assert ColorNet((64, 128, 256, 512), arch="seed").num_params() == 3_099_714


@pytest.mark.parametrize("widths,kernel", [((4, 8), 3), ((3, 5, 7), 5), ((6,), 1)])
def test_parameter_count_and_layer_shapes(widths, kernel):
    model = ColorNet(widths, kernel=kernel, arch="seed")
    chain = [1, *widths, *reversed(widths[:-1]), 2]  # channels through the convs
    expected = sum(conv_params(a, b, kernel) for a, b in zip(chain, chain[1:]))
    assert model.num_params() == expected
    shapes = [layer.params["W"].shape for layer in model.param_layers]
    assert shapes == [(kernel, kernel, a, b) for a, b in zip(chain, chain[1:])]
    assert model.downsample_factor == 2 ** (len(widths) - 1)


def test_forward_shape_range_and_dtype(rng):
    model = ColorNet((4, 8, 8), seed=1, arch="seed")
    lightness = rng.uniform(-1, 1, (3, 12, 8, 1)).astype(np.float32)
    ab = model.forward(lightness)
    assert ab.shape == (3, 12, 8, 2) and ab.dtype == np.float32
    assert np.abs(ab).max() <= 1.0


@pytest.mark.parametrize("shape", [(1, 6, 8, 1), (1, 8, 6, 1), (2, 7, 7, 1), (1, 2, 4, 1)])
def test_size_not_divisible_by_downsampling_factor_raises(shape):
    model = ColorNet((4, 8, 8), arch="seed")  # factor 4
    with pytest.raises(ValueError, match="divide"):
        model.forward(np.zeros(shape, np.float32))


@pytest.mark.parametrize("widths", [(), (4, 0), (-1, 8)])
def test_invalid_widths_raise(widths):
    with pytest.raises(ValueError):
        ColorNet(widths, arch="seed")


def test_seed_fixes_the_initial_weights():
    a, b, c = ColorNet((4, 8), seed=5, arch="seed"), ColorNet((4, 8), seed=5, arch="seed"), ColorNet((4, 8), seed=6, arch="seed")
    for la, lb, lc in zip(a.param_layers, b.param_layers, c.param_layers):
        np.testing.assert_array_equal(la.params["W"], lb.params["W"])
    assert not np.array_equal(a.param_layers[1].params["W"], c.param_layers[1].params["W"])


# ---------------------------------------------------------------------------------------------
# Save / load

def perturbed_model(widths=(4, 8), kernel=3, seed=0) -> ColorNet:
    """A model with non-zero biases, so a loader that forgot them would be caught."""
    model = ColorNet(widths, kernel=kernel, seed=seed, arch="seed")
    r = np.random.default_rng(seed + 100)
    for layer in model.param_layers:
        layer.params["b"] = r.standard_normal(layer.params["b"].shape).astype(np.float32) * 0.1
    return model


def test_save_load_round_trip_float32_exact(tmp_path, rng):
    model = perturbed_model()
    model.save(tmp_path / "m.npz", dtype=np.float32)
    loaded = ColorNet.load(tmp_path / "m.npz")
    for a, b in zip(model.param_layers, loaded.param_layers):
        for name in a.params:
            np.testing.assert_array_equal(a.params[name], b.params[name])
            assert b.params[name].dtype == np.float32
    x = rng.uniform(-1, 1, (2, 8, 6, 1)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), loaded.forward(x))


def test_save_stores_float16_by_default(tmp_path, rng):
    model = perturbed_model(widths=(16, 32))  # big enough that the zip's headers do not dominate
    model.save(tmp_path / "half.npz")
    model.save(tmp_path / "full.npz", dtype=np.float32)
    with np.load(tmp_path / "half.npz") as npz:
        stored = [npz[name] for name in npz.files if name != "__meta__"]
    assert stored and all(a.dtype == np.float16 for a in stored)
    assert (tmp_path / "half.npz").stat().st_size < 0.75 * (tmp_path / "full.npz").stat().st_size
    loaded = ColorNet.load(tmp_path / "half.npz")
    for a, b in zip(model.param_layers, loaded.param_layers):
        for name in a.params:
            assert b.params[name].dtype == np.float32  # computed in float32 again
            np.testing.assert_array_equal(b.params[name], a.params[name].astype(np.float16).astype(np.float32))
    x = rng.uniform(-1, 1, (1, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.forward(x), model.forward(x), atol=5e-3)


def test_architecture_is_rebuilt_from_the_file_alone(tmp_path, rng):
    model = perturbed_model(widths=(3, 5, 7), kernel=5, seed=11)
    model.save(tmp_path / "arch.npz", dtype=np.float32, train_size=24)
    loaded = ColorNet.load(tmp_path / "arch.npz")  # no widths or kernel given
    assert loaded.config == model.config
    assert loaded.config["widths"] == [3, 5, 7] and loaded.config["kernel"] == 5
    assert loaded.num_params() == model.num_params()
    x = rng.uniform(-1, 1, (1, 8, 12, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    _, meta = load_npz(tmp_path / "arch.npz")
    assert meta["train_size"] == 24 and meta["kind"] == "weights"


def test_save_is_atomic_and_overwrites(tmp_path):
    perturbed_model(seed=0).save(tmp_path / "m.npz")
    perturbed_model(seed=1).save(tmp_path / "m.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp file left behind
    loaded = ColorNet.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.param_layers[0].params["W"],
                                  perturbed_model(seed=1).param_layers[0].params["W"].astype(np.float16))


# ---------------------------------------------------------------------------------------------
# Bad weight files: always CorruptFileError, never a crash deeper down

def good_file(tmp_path):
    path = tmp_path / "good.npz"
    perturbed_model().save(path)
    return path


def rewrite(tmp_path, arrays=None, **meta_changes):
    """A file with a valid checksum but edited arrays or metadata."""
    arrays_in, meta = load_npz(good_file(tmp_path))
    arrays = arrays_in if arrays is None else arrays(arrays_in)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "kind", "sha256")}
    kind = meta_changes.pop("kind", "weights")
    meta.update(meta_changes)
    path = tmp_path / "edited.npz"
    save_npz(path, arrays, kind=kind, **meta)
    return path


def with_value(value):
    def edit(arrays):
        arrays = dict(arrays)
        w = arrays["layer0.W"].copy()
        w.flat[3] = value
        arrays["layer0.W"] = w
        return arrays
    return edit


def written(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": lambda tmp: tmp / "nothing_here.npz",
    "folder": lambda tmp: tmp,
    "zero_bytes": lambda tmp: written(tmp / "zero.npz", b""),
    "text": lambda tmp: written(tmp / "text.npz", b"weights, honestly"),
    "truncated_end": lambda tmp: written(tmp / "cut.npz", good_file(tmp).read_bytes()[:-200]),
    "truncated_half": lambda tmp: written(tmp / "half.npz", good_file(tmp).read_bytes()[:1000]),
    "flipped_byte": lambda tmp: flip_byte(good_file(tmp)),
    "plain_npz": lambda tmp: plain_npz(tmp),
    "tampered": lambda tmp: tampered(tmp),
    "nan": lambda tmp: rewrite(tmp, with_value(np.nan)),
    "inf": lambda tmp: rewrite(tmp, with_value(np.inf)),
    "wrong_shape": lambda tmp: rewrite(tmp, config={"widths": [4, 16], "kernel": 3}),
    "wrong_kernel": lambda tmp: rewrite(tmp, config={"widths": [4, 8], "kernel": 5}),
    "missing_param": lambda tmp: rewrite(tmp, lambda a: {k: v for k, v in a.items() if k != "layer3.b"}),
    "no_config": lambda tmp: rewrite(tmp, config=None),
    "bad_config": lambda tmp: rewrite(tmp, config={"widths": "four", "kernel": 3}),
    "wrong_kind": lambda tmp: rewrite(tmp, kind="preview"),
}


def flip_byte(path):
    """Disk corruption: one byte flipped inside a weight array's stored bytes."""
    arrays, _ = load_npz(path)
    raw = arrays["layer3.W"].tobytes()
    data = bytearray(path.read_bytes())
    start = data.find(raw)  # np.savez stores arrays uncompressed
    assert start > 0
    data[start + len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def tampered(tmp):
    """A well-formed .npz whose weights were changed after the checksum was written."""
    with np.load(good_file(tmp)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["layer0.b"] = arrays["layer0.b"] + np.float16(1)
    np.savez(tmp / "tampered.npz", **arrays)
    return tmp / "tampered.npz"


def plain_npz(tmp):
    """A valid .npz with the right array names but not written by nanocolor (no metadata)."""
    arrays, _ = load_npz(good_file(tmp))
    np.savez(tmp / "plain.npz", **arrays)
    return tmp / "plain.npz"


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_weight_files_raise_corrupt_file_error(kind, tmp_path):
    path = BAD_FILES[kind](tmp_path)
    with pytest.raises(CorruptFileError):
        ColorNet.load(path)


def test_wrong_format_version_is_refused(tmp_path):
    path = good_file(tmp_path)
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta["format_version"] = 99
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(CorruptFileError, match="version"):
        ColorNet.load(tmp_path / "future.npz")


def test_weights_beyond_float16_range_are_saved_in_float32_not_as_inf(tmp_path):
    model = ColorNet((2, 4), seed=0, arch="seed")
    model.layers[0].params["W"][0, 0, 0, 0] = 1e6  # a diverged run's weight: inf in float16
    model.save(tmp_path / "big.npz")
    loaded = ColorNet.load(tmp_path / "big.npz")  # would raise CorruptFileError on inf
    assert loaded.layers[0].params["W"][0, 0, 0, 0] == 1e6
