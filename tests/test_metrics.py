"""PSNR, AuC and colorfulness on hand-made images whose answers are worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nanocolor.metrics import auc, colorfulness, colorization_scores, psnr, summarize


def _solid(rgb, height=6, width=5) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3)).copy()


# -- PSNR ----------------------------------------------------------------------------------------

def test_psnr_one_gray_level_everywhere():
    """MSE = 1, so PSNR = 10 log10(255^2) = 48.1308 dB."""
    img = np.random.default_rng(0).integers(0, 255, (7, 9, 3)).astype(np.uint8)
    assert psnr(img + 1, img) == pytest.approx(48.1308, abs=1e-4)
    assert psnr(img, img + 1) == pytest.approx(48.1308, abs=1e-4)  # symmetric


def test_psnr_uint8_difference_does_not_wrap_around():
    """0 vs 255 must be an error of 255 (MSE 255^2, PSNR 0 dB), not uint8 overflow."""
    assert psnr(_solid((0, 0, 0)), _solid((255, 255, 255))) == pytest.approx(0.0, abs=1e-12)


def test_psnr_error_on_part_of_the_pixels():
    """A quarter of the values off by 4: MSE = 16 / 4 = 4, PSNR = 10 log10(65025 / 4) = 42.1102 dB."""
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[:2, :2] = 4  # 4 of 16 pixels, all three channels
    assert psnr(b, a) == pytest.approx(42.1102, abs=1e-4)


def test_psnr_identical_is_infinite_and_peak_scales():
    img = _solid((10, 20, 30))
    assert psnr(img, img) == math.inf
    x = np.full((3, 3, 3), 0.5)
    assert psnr(x + 0.1, x, peak=1.0) == pytest.approx(20.0)  # MSE 0.01 on a 0..1 scale


# -- AuC -----------------------------------------------------------------------------------------

def _ab_with_error(err_vectors) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth ab (n, 2) of arbitrary colors and a prediction off by the given vectors."""
    err = np.asarray(err_vectors, np.float64)
    truth = np.random.default_rng(1).uniform(-60, 60, err.shape)
    return truth + err, truth


def test_auc_all_errors_ten():
    """err = 10 <= t for t = 10..150: 141 of 151 thresholds count everything, the rest nothing."""
    pred, true = _ab_with_error([[10, 0], [0, -10], [6, 8], [-8, 6]])
    assert auc(pred, true) == pytest.approx((151 - 10) / 151)


def test_auc_uses_euclidean_distance():
    """(3, 4) is 5 units away (L2), not 7 (L1) and not 4 (max)."""
    pred, true = _ab_with_error([[3, 4]] * 3)
    assert auc(pred, true) == pytest.approx((151 - 5) / 151)


def test_auc_extremes_and_a_mixture():
    zero, true = _ab_with_error(np.zeros((5, 2)))
    assert auc(zero, true) == pytest.approx(1.0)
    far, true = _ab_with_error([[200, 0]] * 5)
    assert auc(far, true) == 0.0
    at_edge, true = _ab_with_error([[0, 150]])
    assert auc(at_edge, true) == pytest.approx(1 / 151)  # only t = 150 counts (err <= t)
    # half exact, half 200 away: every threshold counts half the pixels
    mixed, true = _ab_with_error([[0, 0], [200, 0]] * 3)
    assert auc(mixed, true) == pytest.approx(0.5)
    # non-integer error 10.5: counted from t = 11 on, 140 thresholds
    frac, true = _ab_with_error([[10.5, 0]])
    assert auc(frac, true) == pytest.approx(140 / 151)


def test_auc_takes_images_of_any_shape():
    """(H, W, 2) images: the same answer as the flat list of pixels."""
    pred, true = _ab_with_error(np.random.default_rng(2).normal(0, 20, (35, 2)))
    assert auc(pred.reshape(5, 7, 2), true.reshape(5, 7, 2)) == pytest.approx(auc(pred, true))


# -- colorfulness (Hasler and Suesstrunk 2003) ---------------------------------------------------
# rg = R - G, yb = (R + G) / 2 - B;  M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)

def test_colorfulness_of_gray_is_zero():
    levels = np.random.default_rng(3).integers(0, 256, (8, 6))
    gray = np.repeat(levels[..., None], 3, axis=-1)
    assert colorfulness(gray) == 0.0
    assert colorfulness(_solid((128, 128, 128))) == 0.0


def test_colorfulness_of_a_solid_red():
    """rg = 255, yb = 127.5 everywhere: no spread, M = 0.3 * sqrt(255^2 + 127.5^2) = 0.3 * 127.5 * sqrt(5)."""
    assert colorfulness(_solid((255, 0, 0))) == pytest.approx(0.3 * 127.5 * math.sqrt(5))  # 85.529


def test_colorfulness_of_half_red_half_blue():
    """Red: rg = 255, yb = 127.5; blue: rg = 0, yb = -255.
    mean rg = 127.5, std rg = 127.5; mean yb = -63.75, std yb = 191.25.
    M = sqrt(127.5^2 + 191.25^2) + 0.3 sqrt(127.5^2 + 63.75^2) = 127.5 sqrt(3.25) + 0.3 * 63.75 sqrt(5)."""
    img = _solid((255, 0, 0), 4, 6)
    img[2:] = (0, 0, 255)
    expected = 127.5 * math.sqrt(3.25) + 0.3 * 63.75 * math.sqrt(5)  # 272.619
    assert colorfulness(img) == pytest.approx(expected)
    assert colorfulness(img.astype(np.float32)) == pytest.approx(expected)  # dtype does not matter


def test_colorfulness_of_black_and_white_halves_is_zero():
    img = _solid((0, 0, 0), 4, 4)
    img[:, 2:] = 255
    assert colorfulness(img) == 0.0


# -- one photo's scores and their summary ---------------------------------------------------------

def test_colorization_scores_of_a_perfect_and_a_gray_output():
    red = _solid((255, 0, 0))
    perfect = colorization_scores(red, red)
    assert perfect["psnr"] == math.inf and perfect["auc"] == pytest.approx(1.0)
    # 8-bit gray of red's lightness (L* 53.24): sRGB level 127 (Y = 0.2127 -> 1.055 Y^(1/2.4) - 0.055 = 0.4985 -> 127.1)
    gray = _solid((127, 127, 127))
    scores = colorization_scores(gray, red)
    assert scores["colorfulness"] == 0.0
    # red's chroma is |(80.09, 67.20)| = 104.55 LAB units: counted only from t = 105
    assert scores["auc"] == pytest.approx((151 - 105) / 151, abs=1e-9)
    mse = ((255 - 127) ** 2 + 127 ** 2 + 127 ** 2) / 3
    assert scores["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse))


def test_summary_means_and_ratio():
    scores = [{"psnr": 20.0, "auc": 0.8, "colorfulness": 10.0}, {"psnr": 30.0, "auc": 0.9, "colorfulness": 20.0}]
    summary = summarize(scores, original_colorfulness=[30.0, 30.0])
    assert summary == pytest.approx({"psnr": 25.0, "auc": 0.85, "colorfulness": 15.0, "colorfulness_ratio": 0.5})
    assert math.isnan(summarize(scores, [0.0, 0.0])["colorfulness_ratio"])
