"""python -m nanocolor.evaluate on a few made photos with a tiny untrained model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import colorful_rgb, gray_rgb, save_image
from nanocolor.evaluate import evaluate_folder, main
from nanocolor.infer import colorize_array
from nanocolor.model import ColorNet


@pytest.fixture
def photos(tmp_path):
    """3 color photos (20 x 26), 1 gray photo and 1 broken file, in two subfolders."""
    root = tmp_path / "photos"
    for i in range(3):
        save_image(root / "a" / f"{i}.png", colorful_rgb(20, 26, seed=i))
    save_image(root / "b" / "gray.png", gray_rgb(20, 26))
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.npz"
    ColorNet(widths=(4, 8), seed=0, arch="seed").save(path, train_size=8)
    return path


def test_a_work_size_stored_with_the_weights_is_the_default(photos, tmp_path, capsys):
    path = tmp_path / "chosen.npz"
    ColorNet(widths=(4, 8), seed=0, arch="seed").save(path, train_size=8, work_size=24)
    assert main(["--data", str(photos), "--weights", str(path), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["work_size"] == 24
    assert main(["--data", str(photos), "--weights", str(path), "--work-size", "40", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["work_size"] == 40
    for bad in (0, "big", 4096):
        ColorNet(widths=(4, 8), seed=0, arch="seed").save(path, train_size=8, work_size=bad)
        assert main(["--data", str(photos), "--weights", str(path), "--quiet"]) == 2
        assert "work size" in capsys.readouterr().err


def test_table_json_and_gallery(photos, weights, tmp_path, capsys):
    gallery = tmp_path / "gallery.png"
    rc = main(["--data", str(photos), "--weights", str(weights), "--gallery", str(gallery), "--json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert (result["photos"], result["skipped_gray"], result["unreadable"]) == (3, 1, 1)
    assert result["work_size"] == 16  # twice the training size stored with the weights
    for name in ("model", "gray"):
        scores = result[name]
        assert set(scores) == {"psnr", "auc", "colorfulness", "colorfulness_ratio"}
        assert math.isfinite(scores["psnr"]) and 0 <= scores["auc"] <= 1
    assert result["gray"]["colorfulness_ratio"] == pytest.approx(0, abs=0.01)
    assert result["original_colorfulness"] > 20
    table = "\n".join(lines[:-1])
    for row in ("gray baseline", "model", "originals", "PSNR", "AuC"):
        assert row in table
    assert f"{result['model']['psnr']:.2f}" in table and f"{result['gray']['auc']:.4f}" in table
    # 3 rows x 3 columns of 20 x 26 photos with 4-pixel gaps
    assert Image.open(gallery).size == (3 * 26 + 2 * 4, 3 * 20 + 2 * 4)


def test_gray_baseline_of_a_solid_red_photo(tmp_path):
    """Hand-worked: red's L* = 53.24 -> gray level 127; its a*b* (80.09, 67.20) is 104.55 away from 0."""
    save_image(tmp_path / "red" / "r.png", np.full((16, 16, 3), (255, 0, 0), np.uint8))
    ev = evaluate_folder(ColorNet(widths=(4, 8), seed=0, arch="seed"), tmp_path / "red", work_size=16)
    mse = ((255 - 127) ** 2 + 127 ** 2 + 127 ** 2) / 3
    assert ev.gray["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse))
    assert ev.gray["auc"] == pytest.approx((151 - 105) / 151)
    assert ev.original_colorfulness == pytest.approx(0.3 * 127.5 * math.sqrt(5))  # rg = 255, yb = 127.5
    assert ev.gray["colorfulness"] == 0


def test_model_predicting_no_color_scores_like_the_gray_baseline(photos):
    """A last conv of zeros gives ab = tanh(0) = 0: the model's output is the gray baseline itself."""
    model = ColorNet(widths=(4, 8), seed=0, arch="seed")
    last = model.param_layers[-1]
    last.params["W"][:] = 0
    last.params["b"][:] = 0
    ev = evaluate_folder(model, photos, work_size=16, gallery_photos=2)
    assert ev.model == pytest.approx(ev.gray)
    assert len(ev.gallery_rows) == 2
    gray, original, colorized = ev.gallery_rows[0]
    np.testing.assert_allclose(colorized, gray, atol=1e-6)
    assert original.shape == (20, 26, 3)


def test_limit_and_errors(photos, weights, tmp_path, capsys):
    assert main(["--data", str(photos), "--weights", str(weights), "--limit", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["photos"] == 2
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--weights", str(weights), "--quiet"]) == 2
    assert "no readable color photo" in capsys.readouterr().err
    assert main(["--data", str(photos), "--weights", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert "missing.npz" in capsys.readouterr().err


def test_gallery_every_k_takes_photos_spread_over_the_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):  # photo i is a solid color whose red channel encodes its index
        Image.fromarray(np.full((16, 16, 3), (40 * i + 20, 200, 30), np.uint8)).save(folder / f"{i}.png")
    model = ColorNet((2, 4), seed=0, arch="seed")
    ev = evaluate_folder(model, folder, work_size=16, gallery_photos=3, gallery_every=2)
    reds = [int(round(row[1][0, 0, 0] * 255)) for row in ev.gallery_rows]
    assert reds == [20, 100, 180]  # photos 0, 2 and 4


def test_a_table_per_subfolder(tmp_path, weights, capsys):
    for folder, count in (("faces", 2), ("rooms", 3)):
        for i in range(count):
            save_image(tmp_path / "data" / folder / f"{i}.png", colorful_rgb(16, 16, seed=10 * count + i))
    ev = evaluate_folder(ColorNet(widths=(4, 8), seed=0, arch="seed"), tmp_path / "data", work_size=16)
    assert {name: part["photos"] for name, part in ev.per_folder.items()} == {"faces": 2, "rooms": 3}
    # the whole is the photo-weighted mean of its parts
    whole = (2 * ev.per_folder["faces"]["model"]["psnr"] + 3 * ev.per_folder["rooms"]["model"]["psnr"]) / 5
    assert ev.model["psnr"] == pytest.approx(whole)
    assert main(["--data", str(tmp_path / "data"), "--weights", str(weights), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "faces: 2 photos" in table and "rooms: 3 photos" in table


def test_chroma_gains_get_a_row_each(photos, weights, capsys):
    assert main(["--data", str(photos), "--weights", str(weights), "--quiet", "--json",
                 "--chroma-gain", "1", "0.5", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result["other_gains"]) == {"0.5", "2.0"}
    colorful = [result["model"]["colorfulness"], result["other_gains"]["0.5"]["colorfulness"],
                result["other_gains"]["2.0"]["colorfulness"]]
    assert colorful[1] < colorful[0] < colorful[2]  # the gain scales the colors
    assert any("chroma gain 2" in line for line in lines)
    assert main(["--data", str(photos), "--weights", str(weights), "--chroma-gain", "0"]) == 2


def test_other_gains_score_as_the_model_at_that_gain(photos, weights):
    """The rows of other gains (one pass of the network, scaled) equal whole evaluations at each gain."""
    model = ColorNet.load(weights)
    ev = evaluate_folder(model, photos, 64, gallery_photos=0, other_gains=(0.5, 1.7))
    for gain in (0.5, 1.7):
        model.chroma_gain = gain
        at_gain = evaluate_folder(model, photos, 64, gallery_photos=2)
        assert at_gain.model == ev.other_gains[gain]
        for _, original, colorized in at_gain.gallery_rows:  # as colorize.py colorizes at that gain
            np.testing.assert_array_equal(colorized, colorize_array(model, original, 64))
