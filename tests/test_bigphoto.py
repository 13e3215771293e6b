"""Colorizing in row bands (nanocolor/infer.py): the same numbers whatever the bands, and the
documented lightness guarantee on the 8-bit path that colorize.py takes."""
import numpy as np
import pytest

from nanocolor import infer
from nanocolor.color import rgb_to_lab
from nanocolor.model import ColorNet

L8_TOL = 0.26  # docs/reliability.md: the only L* change left is 8-bit rounding


@pytest.fixture(scope="module")
def model():
    m = ColorNet((4, 8), seed=1, arch="seed")
    for layer in m.param_layers:  # vivid colors, many out of gamut: the gamut fit is exercised
        layer.params["W"] = layer.params["W"] * 3
    return m


def photo(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("band_pixels", [1, 37, 1 << 17])
def test_bands_give_the_numbers_of_one_band(monkeypatch, model, band_pixels):
    rgb = photo(45, 38)
    whole = infer.colorize_array(model, rgb, 16)
    monkeypatch.setattr(infer, "BAND_PIXELS", band_pixels)
    # PIL samples a band's rows from a sub-box of the small prediction: equal up to float rounding
    np.testing.assert_allclose(infer.colorize_array(model, rgb, 16), whole, atol=1e-5)
    np.testing.assert_allclose(infer.predict_ab(model, infer.full_lightness(rgb), 16),
                               infer.predict_ab(model, rgb_to_lab(rgb / 255.0)[..., 0], 16), atol=1e-3)


def test_full_lightness_of_8_bit_levels_matches_rgb_to_lab(monkeypatch):
    monkeypatch.setattr(infer, "BAND_PIXELS", 100)
    rgb = photo(31, 29, seed=2)
    exact = rgb_to_lab(rgb / 255.0)[..., 0]
    assert np.abs(infer.full_lightness(rgb) - exact).max() < 1e-4  # float32, by table
    assert np.abs(infer.full_lightness(rgb, np.float64) - exact).max() < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_8_bit_path_keeps_lightness_within_rounding(monkeypatch, model, seed):
    monkeypatch.setattr(infer, "BAND_PIXELS", 64)
    rgb = photo(40, 56, seed)
    rgb[:8] //= 16  # dark grays, where L* is steepest over sRGB
    out = infer.colorize_array(model, rgb, 16, out_dtype=np.uint8)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    dL = np.abs(rgb_to_lab(out / 255.0)[..., 0] - rgb_to_lab(rgb / 255.0)[..., 0])
    assert dL.max() <= L8_TOL
    chroma = np.hypot(*np.moveaxis(rgb_to_lab(out / 255.0)[..., 1:], -1, 0))
    assert chroma.mean() > 5  # it did colorize
    # and the 8-bit output is the float64 result rounded, but for levels float32 puts across a half
    reference = np.clip(infer.colorize_array(model, rgb, 16) * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(out.astype(int) - reference).max() <= 1
    assert (out != reference).mean() < 0.01


def test_float32_inputs_of_16_bit_photos_take_the_float_path(model):
    gray = np.random.default_rng(5).uniform(0, 1, (20, 24, 1)).astype(np.float32).repeat(3, axis=-1)
    out = infer.colorize_array(model, gray, 16, out_dtype=np.uint8)
    dL = np.abs(rgb_to_lab(out / 255.0)[..., 0] - rgb_to_lab(gray.astype(np.float64))[..., 0])
    assert dL.max() <= L8_TOL
