"""A kind head: what kind of photo the net colorizes, from its encoder, and a chroma gain for each
kind (model.KindHead, nanocolor.kindhead), and the files that carry it."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script, make_photos
from nanocolor import engine, kindhead
from nanocolor.infer import colorize_array, load_colorizer, predict_working_ab
from nanocolor.model import ColorNet
from nanocolor.serialize import CorruptFileError, load_npz, save_npz


def with_random_kinds(model: ColorNet, kinds: list, gains: list, rng) -> ColorNet:
    model.with_kind_head(kinds)
    linear = model.kind_head.linear
    linear.params["W"] = rng.standard_normal(linear.params["W"].shape).astype(np.float32)
    linear.params["b"] = rng.standard_normal(len(kinds)).astype(np.float32)
    model.kind_head.gains = gains
    return model


def test_a_photos_gain_is_the_kinds_gains_weighed_by_their_probabilities(rng):
    model = with_random_kinds(ColorNet((4, 8, 6), seed=1, arch="unet"), ["a", "b", "c"], [0.5, 1.0, 2.0], rng)
    lightness = rng.uniform(-1, 1, (3, 8, 12, 1)).astype(np.float32)
    x, skips = model.encode(lightness)
    maps = [*skips, x]
    pooled = np.concatenate([m.mean(axis=(1, 2)) for m in maps], axis=-1)
    assert pooled.shape == (3, 4 + 8 + 6)
    logits = pooled.astype(np.float64) @ model.kind_head.linear.params["W"] + model.kind_head.linear.params["b"]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(model.kind_head.probabilities(maps), probabilities, rtol=1e-5)
    gains = model.photo_gains(lightness)
    np.testing.assert_allclose(gains, probabilities @ [0.5, 1.0, 2.0], rtol=1e-5)
    assert gains.shape == (3,) and np.all((gains >= 0.5 - 1e-6) & (gains <= 2.0 + 1e-6))  # within the kinds' gains
    model.kind_head.gains = [1.3, 1.3, 1.3]  # one gain for every kind: that gain, whatever the photo
    np.testing.assert_allclose(model.photo_gains(lightness), 1.3, rtol=1e-6)
    with pytest.raises(ValueError, match="two kinds"):
        model.with_kind_head(["alone"])


def test_colorizing_multiplies_the_nets_colors_by_the_photos_gain(rng):
    model = ColorNet((4, 8), seed=2, arch="unet")
    model.chroma_gain = 1.2
    small = rng.uniform(0, 100, (16, 20))
    plain = predict_working_ab(model, small)
    np.testing.assert_array_equal(model.photo_gains(np.zeros((2, 4, 4, 1), np.float32)), [1, 1])  # no head: 1
    with_random_kinds(model, ["a", "b"], [0.7, 1.6], rng)
    factor = float(model.photo_gains(((small / 50 - 1)[None, ..., None]).astype(np.float32))[0])
    assert 0.7 < factor < 1.6
    np.testing.assert_allclose(predict_working_ab(model, small), plain * factor, rtol=1e-5, atol=1e-6)
    other_gains = predict_working_ab(model, small, (1.2, 1.5))  # evaluate's extra gains: the factor too
    np.testing.assert_allclose(other_gains[1], plain / 1.2 * 1.5 * factor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", ["im2col", "auto"])
def test_colorizing_reads_the_photos_gain_from_the_same_pass(conv, rng, monkeypatch):
    """The factor comes from the encoder's maps of the pass that predicts the colors (`encoded`,
    the textbook's and the fast engine's alike): the encoder runs once a photo, not twice."""
    model = with_random_kinds(ColorNet((4, 8, 6), seed=3, arch="unet"), ["a", "b"], [0.7, 1.6], rng)
    small = rng.uniform(0, 100, (16, 20))
    lightness = ((small / 50 - 1)[None, ..., None]).astype(np.float32)
    factor = float(model.photo_gains(lightness)[0])  # the textbook's encoder on its own
    textbook_maps = model.encoded
    kind_head, model.kind_head = model.kind_head, None
    plain = predict_working_ab(model, small)
    model.kind_head = kind_head
    model.encode(-lightness)  # the model's maps now of another photo: what predicts must read its own pass
    encodes, encode = [], ColorNet.encode
    monkeypatch.setattr(ColorNet, "encode", lambda self, x: encodes.append(x.shape) or encode(self, x))
    with engine.use_conv(conv):
        np.testing.assert_allclose(predict_working_ab(model, small), plain * factor, rtol=1e-4, atol=1e-3)  # LAB units
        net = engine.network(model)
        net.forward(lightness)
    assert len(encodes) == (2 if conv == "im2col" else 0)  # the textbook's forward encodes, the fast engine its own way
    assert [m.shape for m in net.encoded] == [(1, 16, 20, 4), (1, 8, 10, 8), (1, 4, 5, 6)]
    for fast_map, textbook_map in zip(net.encoded, textbook_maps):
        np.testing.assert_allclose(fast_map, textbook_map, rtol=1e-4, atol=1e-5)


def test_fitting_learns_kinds_that_the_features_tell_apart(rng):
    """Features whose third column's sign tells the kind: the fitted layer, standardization folded
    back, computes logits that name each photo's kind."""
    model = ColorNet((4, 8), seed=0, arch="unet").with_kind_head(["x", "y"])
    features = rng.standard_normal((400, 12)) * 4 + 7  # off-center, not unit scale
    kinds = (features[:, 2] > 7).astype(int)
    losses = kindhead.fit_kind_head(model, features, kinds, epochs=200, lr=0.05, l2=1e-4)
    assert losses[-1] < 0.3 * losses[0]
    linear = model.kind_head.linear
    logits = features @ linear.params["W"] + linear.params["b"]
    assert np.mean(logits.argmax(axis=1) == kinds) > 0.95


def test_kind_head_survives_saving_and_a_class_head(tmp_path, rng):
    model = with_random_kinds(ColorNet((4, 8), seed=0, arch="unet"), ["faces", "sea"], [1.15, 0.9], rng)
    path = tmp_path / "kinds.npz"
    model.save(path)
    again = ColorNet.load(path)
    assert again.kind_head.kinds == ["faces", "sea"] and again.kind_head.gains == [1.15, 0.9]
    lightness = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(again.photo_gains(lightness), model.photo_gains(lightness), rtol=1e-2)
    assert again.with_class_head(5).kind_head is again.kind_head  # same encoder, same kinds
    assert ColorNet((4, 8), arch="unet").kind_head is None
    arrays, meta = load_npz(path)
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "sha256")}
    for kinds, match in (({"names": ["faces", "sea"], "gains": [1.1, -1]}, "kinds"),
                         ({"names": ["faces", "sea"]}, "kinds"),
                         ({"names": "ab", "gains": [1, 1]}, "kinds"),  # a string is not a list of names
                         ({"names": ["faces", "sea", "sky"], "gains": [1, 1, 1]}, "kind.layer")):
        save_npz(tmp_path / "bad.npz", arrays, **{**extra, "kinds": kinds})
        with pytest.raises(CorruptFileError, match=match):
            ColorNet.load(tmp_path / "bad.npz")


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.npz"
    ColorNet((4, 8), seed=0, arch="unet").save(path, train_size=16, work_size=16, cpu_seconds=10.0)
    return path


def test_kindhead_cli_fits_the_folders_kinds_then_sets_their_gains(net_file, tmp_path, capsys):
    data = tmp_path / "photos"
    for i, kind in enumerate(("beach", "city", "faces")):
        make_photos(data / kind, 6, size=20, seed=10 * i)
    out = tmp_path / "kinds.npz"
    code = kindhead.main(["--weights", str(net_file), "--data", str(data), "--out", str(out), "--size", "16",
                          "--crop-margin", "4", "--per-kind", "4", "--epochs", "20", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model, work_size = load_colorizer(out)
    assert model.kind_head.kinds == ["beach", "city", "faces"] and model.kind_head.gains == [1.0, 1.0, 1.0]
    _, meta = load_npz(out)
    assert work_size == 16 and meta["kind_head"]["photos"] == 12 and meta["cpu_seconds"] >= 10.0
    rgb = np.asarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3)), np.uint8)
    base, _ = load_colorizer(net_file)
    np.testing.assert_allclose(colorize_array(model, rgb, 16), colorize_array(base, rgb, 16), atol=1e-6)  # all at 1
    chosen = tmp_path / "chosen.npz"
    assert kindhead.main(["--weights", str(out), "--gain", "beach=1.4", "--gain", "city=1.4",
                          "--gain", "faces=1.4", "--out", str(chosen)]) == 0
    assert ColorNet.load(chosen).kind_head.gains == [1.4, 1.4, 1.4]
    code = kindhead.main(["--weights", str(out), "--gain", "forest=1.2", "--out", str(tmp_path / "x.npz")])
    assert code == 2 and "no kind forest (the kinds: beach, city, faces)" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
    base.chroma_gain = 1.4  # every kind at 1.4: as a chroma gain of 1.4
    np.testing.assert_allclose(colorize_array(load_colorizer(chosen)[0], rgb, 16).astype(float),
                               colorize_array(base, rgb, 16).astype(float), atol=1.01)


def test_kindhead_cli_refuses_without_losing_a_file(net_file, tmp_path, capsys):
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"keep me")
    code = kindhead.main(["--weights", str(net_file), "--out", str(existing), "--gain", "a=1.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exists" in err[0] and existing.read_bytes() == b"keep me"
    for args, message in ((["--gain", "a=1.1"], "no kind head"), (["--gain", "a"], "KIND=GAIN"),
                          (["--gain", "a=-1"], "--gain a")):
        code = kindhead.main(["--weights", str(net_file), "--out", str(tmp_path / "x.npz"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and not (tmp_path / "x.npz").exists()
    one_kind = make_photos(tmp_path / "one" / "only", 4, size=20)
    code = kindhead.main(["--weights", str(net_file), "--data", str(one_kind.parent), "--out", str(tmp_path / "x.npz"),
                          "--size", "16", "--crop-margin", "4", "--quiet"])
    assert code == 2 and "two kinds" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


def test_a_photos_kind_is_its_subfolder_also_in_a_folder_of_links(tmp_path):
    photos = make_photos(tmp_path / "elsewhere", 2, size=8)
    links = tmp_path / "val"
    (links / "faces").mkdir(parents=True)
    for photo in sorted(photos.glob("*.png")):
        (links / "faces" / photo.name).symlink_to(photo)
    assert kindhead.kind_of(links / "faces" / photo.name, [links]) == "faces"  # the link's folder, not its target's
    assert kindhead.kind_of(photo, [photos]) == "elsewhere"  # a photo right in the folder: the folder's name
    with pytest.raises(ValueError, match="lies in none"):
        kindhead.kind_of(photo, [links])


def test_kind_gains_are_chosen_for_the_least_color_each_folder_asks(rng):
    """Two folders of photos sure of their kind, PSNR falling and colorfulness rising with the
    gain: the chosen gains are the smallest on the grid that give each folder its ratio."""
    bench = load_script("bench/kind_gains.py", "kind_gains")
    grid, n = bench.GRID, 40
    folder = np.array(["rooms"] * 20 + ["woods"] * 20)
    probs = np.where(folder[:, None] == np.array(["rooms", "woods"]), 0.99, 0.01)
    s = {"folder": folder, "sub": folder, "probs": probs, "orig": np.full(n, 10.0), "gray": np.full(n, 20.0),
         "psnr": np.tile(25 - grid, (n, 1)), "auc": np.tile(0.9 - 0.01 * grid, (n, 1)),
         "colorfulness": np.outer(rng.uniform(7, 9, n), grid)}
    g = bench.choose(s, 2, {"rooms": 0.9, "woods": 1.05}, max_ratio=1.2)
    for k, name in enumerate(("rooms", "woods")):
        mask = folder == name
        ratio = lambda gains: bench.summary(s, probs @ gains, mask)[1]
        assert ratio(g) >= {"rooms": 0.9, "woods": 1.05}[name]
        assert ratio(np.where(np.arange(2) == k, g - 0.05, g)) < {"rooms": 0.9, "woods": 1.05}[name]


def test_kind_gains_hold_every_kind_above_its_floor(rng):
    """The people lose 0.5 dB per unit of gain, the rooms 1 dB: the cheapest color is the people's,
    until a floor of +0.6 dB above gray holds them at gain 0.8 and the rooms make up the folder's
    colorfulness."""
    bench = load_script("bench/kind_gains.py", "kind_gains")
    grid, n = bench.GRID, 40
    folder = np.array(["rooms"] * 20 + ["people"] * 20)
    probs = np.where(folder[:, None] == np.array(["rooms", "people"]), 0.99, 0.01)
    psnr = np.concatenate([np.tile(22 - grid, (20, 1)), np.tile(21 - 0.5 * grid, (20, 1))])
    s = {"folder": np.array(["all"] * n), "sub": folder, "probs": probs, "orig": np.full(n, 10.0),
         "gray": np.full(n, 20.0), "psnr": psnr, "auc": np.zeros((n, len(grid))),
         "colorfulness": np.tile(8 * grid, (n, 1))}
    people, everyone = folder == "people", np.full(n, True)
    g = bench.choose(s, 2, {"all": 0.6}, max_ratio=1.5)
    assert bench.summary(s, probs @ g, people)[0] < 0.55 and g[1] >= 0.95
    g = bench.choose(s, 2, {"all": 0.6}, max_ratio=1.5, floor=0.6)
    assert bench.summary(s, probs @ g, people)[0] >= 0.6 and g[1] <= 0.8
    assert bench.summary(s, probs @ g, everyone)[1] >= 0.6 - 1e-9  # the rooms make up the color


def test_train_init_from_a_file_with_kinds_leaves_the_kind_head_out(tmp_path, net_file, rng):
    from conftest import run_train
    path = tmp_path / "kinds.npz"
    with_random_kinds(ColorNet.load(net_file), ["a", "b"], [1.2, 0.8], rng).save(path, train_size=16)
    photos = make_photos(tmp_path / "photos", 10, size=16)
    result = run_train("--data", str(photos), "--init", str(path), "--widths", "4,8", "--epochs", "1",
                       "--size", "16", "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kind head is left out" in result.stderr
    assert ColorNet.load(tmp_path / "run" / "model.npz").kind_head is None
