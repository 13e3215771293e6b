"""A class head beside the a*b* head: the model's hybrid output, fitting the head on fixed
features (nanocolor.classhead), the blended decoding, and the files that carry it."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_conv, make_photos, tiny_weights
from nanocolor import classhead
from nanocolor.classify import ab_bins, annealed_mean, blended_ab
from nanocolor.color import scale_ab, unscale_ab
from nanocolor.infer import colorize_array, load_colorizer
from nanocolor.model import DECODE_DEFAULTS, ColorNet
from nanocolor.serialize import CorruptFileError, load_npz, save_npz


@pytest.mark.parametrize("k,shape", [(3, (2, 5, 7, 4)), (1, (1, 4, 4, 3)), (5, (1, 6, 3, 2))])
def test_patches_at_pixels_times_the_weights_are_the_conv_there(k, shape, rng):
    conv = make_conv(shape[-1], 6, k)
    features = rng.standard_normal(shape)
    rows = rng.integers(0, shape[1], (shape[0], 9))
    cols = rng.integers(0, shape[2], (shape[0], 9))
    rows[:, 0], cols[:, 0] = 0, shape[2] - 1  # corners: the zero padding counts
    expected = conv.forward(features)[np.arange(shape[0])[:, None], rows, cols].reshape(-1, 6)
    got = classhead.patches_at(features, rows, cols, k) @ conv.params["W"].reshape(-1, 6) + conv.params["b"]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_with_class_head_keeps_the_regression_and_adds_the_logits(rng):
    base = ColorNet((4, 8), seed=3, arch="unet")
    hybrid = base.with_class_head(7, seed=1)
    lightness = rng.uniform(-1, 1, (2, 8, 6, 1)).astype(np.float32)
    out = hybrid.forward(lightness)
    assert out.shape == (2, 8, 6, 9) and hybrid.config["class_bins"] == 7
    np.testing.assert_array_equal(out[..., :2], base.forward(lightness))
    assert "class_bins" not in base.config  # files without a class head keep their old config
    again = hybrid.with_class_head(5)  # a new head replaces the old one
    assert again.forward(lightness).shape == (2, 8, 6, 7)
    with pytest.raises(ValueError, match="class head"):
        ColorNet((4, 8), out_channels=7, head="logits", class_bins=5)


def test_blended_ab_weighs_the_regression_against_the_annealed_mean(rng):
    centers = ab_bins()
    out = rng.standard_normal((2, 3, 4, 2 + len(centers))).astype(np.float32)
    regressed, annealed = unscale_ab(out[..., :2]), annealed_mean(out[..., 2:], centers, 0.4)
    np.testing.assert_allclose(blended_ab(out, 0.4, 1.0), regressed, rtol=1e-6)
    np.testing.assert_allclose(blended_ab(out, 0.4, 0.0), annealed, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(blended_ab(out, 0.4, 0.25), 0.25 * regressed + 0.75 * annealed, rtol=1e-5, atol=1e-4)


def test_fitting_learns_colors_that_the_features_tell_apart(rng):
    """Features whose first channel's sign says red or blue: the fitted head paints each pixel its
    color, and the logits the conv computes are those the fit scored (standardization folded back)."""
    model = ColorNet((4, 8), seed=0, arch="unet").with_class_head(len(ab_bins()))
    red, blue = np.array([60.0, 40.0]), np.array([10.0, -50.0])
    patches = rng.standard_normal((6000, 9 * 8)).astype(np.float32) * 3 + 5  # off-center, not unit scale
    is_red = patches[:, 4 * 8] > 5  # the center pixel's first channel
    true_ab = np.where(is_red[:, None], red, blue) + rng.normal(0, 2, (6000, 2))
    losses = classhead.fit_class_head(model, patches, true_ab, epochs=20, lr=2e-2, batch_size=512, progress=False)
    assert losses[-1] < losses[0] - 1
    head = model.class_head
    logits = patches @ head.params["W"].reshape(len(patches[0]), -1) + head.params["b"]
    painted = annealed_mean(logits, ab_bins(), 0.2)
    own = np.linalg.norm(painted - np.where(is_red[:, None], red, blue), axis=1)
    other = np.linalg.norm(painted - np.where(is_red[:, None], blue, red), axis=1)
    assert (own < other).mean() > 0.94 and np.median(own) < 10  # near the boundary, a blend of both


@pytest.fixture
def regression_weights(tmp_path):
    path = tmp_path / "net.npz"
    ColorNet((4, 8), seed=0, arch="unet").save(path, train_size=16, work_size=16)
    return path


def test_classhead_cli_fits_a_head_and_colorizing_blends_it(regression_weights, tmp_path, capsys):
    photos = make_photos(tmp_path / "photos", 12, size=20)
    out = tmp_path / "hybrid.npz"
    code = classhead.main(["--weights", str(regression_weights), "--data", str(photos), "--out", str(out),
                           "--size", "16", "--crop-margin", "4", "--photos", "8", "--pixels", "20", "--epochs", "2",
                           "--temperature", "0.4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model, work_size = load_colorizer(out)
    assert model.config["class_bins"] == len(ab_bins()) and work_size == 16
    assert model.decode == {"temperature": 0.4, "regression_weight": DECODE_DEFAULTS["regression_weight"]}
    _, meta = load_npz(out)
    assert meta["class_head"]["photos"] == 8 and len(meta["class_head"]["losses"]) == 2
    assert meta["class_head"]["cpu_seconds"] >= 0  # recorded (a tiny fit may round to 0)
    rgb = np.asarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3)), np.uint8)
    blended = colorize_array(model, rgb, 16)
    # regression weight 1, given with the decode settings alone: the base net's colors exactly
    only_regression = tmp_path / "regression.npz"
    assert classhead.main(["--weights", str(out), "--out", str(only_regression), "--regression-weight", "1",
                           "--chroma-gain", "1.3"]) == 0
    assert ColorNet.load(only_regression).chroma_gain == 1.3 and ColorNet.load(out).chroma_gain == 1.0
    base, _ = load_colorizer(regression_weights)
    again, _ = load_colorizer(only_regression)
    base.chroma_gain = 1.3
    np.testing.assert_array_equal(colorize_array(again, rgb, 16), colorize_array(base, rgb, 16))
    base.chroma_gain = 1.0
    assert np.abs(blended - colorize_array(base, rgb, 16)).max() > 1e-3  # the bins did count


def test_classhead_cli_refuses_without_losing_a_file(regression_weights, tmp_path, capsys):
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"keep me")
    code = classhead.main(["--weights", str(regression_weights), "--out", str(existing), "--temperature", "0.3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exists" in err[0] and existing.read_bytes() == b"keep me"
    code = classhead.main(["--weights", str(regression_weights), "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no class head" in err[0] and not (tmp_path / "x.npz").exists()
    code = classhead.main(["--weights", str(regression_weights), "--out", str(tmp_path / "x.npz"),
                           "--regression-weight", "1.5"])
    assert code == 2 and "--regression-weight" in capsys.readouterr().err


def test_bad_decode_settings_in_a_file_are_a_corrupt_file(tmp_path):
    model = ColorNet((4, 8), seed=0, arch="unet").with_class_head(5)
    model.decode["temperature"] = 0.3
    good = tmp_path / "good.npz"
    model.save(good)
    assert ColorNet.load(good).decode["temperature"] == 0.3
    arrays, meta = load_npz(good)
    meta["decode"] = {"temperature": -1, "regression_weight": 0.5}
    save_npz(tmp_path / "bad.npz", arrays, **{k: v for k, v in meta.items() if k not in ("format_version", "sha256")})
    with pytest.raises(CorruptFileError, match="decode settings"):
        ColorNet.load(tmp_path / "bad.npz")


def test_train_init_from_a_hybrid_file_trains_its_regression(tmp_path, regression_weights):
    """train.py --init with a file that has a class head: a warning, and the a*b* net trains."""
    from conftest import run_train
    hybrid = ColorNet.load(regression_weights).with_class_head(5)
    path = tmp_path / "hybrid.npz"
    hybrid.save(path, train_size=16)
    photos = make_photos(tmp_path / "photos", 10, size=16)
    result = run_train("--data", str(photos), "--init", str(path), "--widths", "4,8", "--epochs", "1",
                       "--size", "16", "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "class head is left out" in result.stderr
    assert "class_bins" not in ColorNet.load(tmp_path / "run" / "model.npz").config


@pytest.mark.parametrize("start_bins", [0, len(ab_bins())])
def test_train_hybrid_trains_both_heads_from_a_file(tmp_path, regression_weights, start_bins):
    """--loss hybrid --init: the file's class head is kept (or a fresh one added beside its a*b*
    head), every weight starts as the file's, and the result colorizes through both heads."""
    from conftest import run_train
    start = ColorNet.load(regression_weights)
    if start_bins:
        start = start.with_class_head(start_bins, seed=3)
    path = tmp_path / "start.npz"
    start.save(path, train_size=16)
    photos = make_photos(tmp_path / "photos", 10, size=16)
    # a learning rate too small to move a float16 weight: what comes out is where training started
    result = run_train("--data", str(photos), "--init", str(path), "--widths", "4,8", "--loss", "hybrid",
                       "--lr", "1e-30", "--epochs", "1", "--size", "16", "--batch-size", "4",
                       "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "class head is left out" not in result.stderr
    trained, _ = load_colorizer(tmp_path / "run" / "model.npz")
    assert trained.config["class_bins"] == len(ab_bins())
    started, ended = ColorNet.load(path).state_arrays(), trained.state_arrays()
    head = f"layer{trained.layers.index(trained.class_head)}."
    convs = [k for k in started if k.endswith(".W") and (start_bins or not k.startswith(head))]
    assert convs and all(np.array_equal(started[k], ended[k]) for k in convs)
    assert np.isfinite(colorize_array(trained, np.random.default_rng(0).random((20, 12, 3)), 16)).all()


def test_train_hybrid_resumes_and_refuses_what_it_cannot_do(tmp_path):
    from conftest import run_train
    photos = make_photos(tmp_path / "photos", 10, size=16)
    common = ("--data", str(photos), "--widths", "4,8", "--size", "16", "--batch-size", "4", "--quiet")
    run = tmp_path / "run"
    result = run_train(*common, "--loss", "hybrid", "--class-weight", "0.05", "--epochs", "1", "--out", str(run),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_train("--resume", str(run), "--epochs", "2", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, meta = load_npz(run / "checkpoint.npz", kinds=("checkpoint",))
    assert (meta["epoch"], meta["train_config"]["loss"], meta["train_config"]["class_weight"]) == (2, "hybrid", 0.05)
    for bad, said in ((("--loss", "hybrid", "--rebalance", "0.5"), "without rebalancing"),
                      (("--loss", "hybrid", "--class-weight", "0"), "--class-weight"),
                      (("--class-weight", "0.01"), "only applies with --loss hybrid")):
        result = run_train(*common, *bad, "--out", str(tmp_path / "no"), cwd=tmp_path)
        assert result.returncode == 2 and said in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "no").exists()
