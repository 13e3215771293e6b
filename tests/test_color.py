"""sRGB <-> CIE LAB (D65) against published reference values, round trips, and the network scaling."""
from __future__ import annotations

import numpy as np
import pytest

from nanocolor.color import (AB_SCALE, lab_from_parts, lab_to_rgb, rgb_to_lab, scale_ab, scale_lightness,
                             unscale_ab, unscale_lightness)

# 8-bit sRGB -> (L*, a*, b*), D65, from standard colorimetry tables (e.g. Bruce Lindbloom's calculator)
KNOWN = [
    ((255, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((255, 255, 0), (97.14, -21.55, 94.48)),
    ((0, 255, 255), (91.11, -48.09, -14.13)),
    ((255, 0, 255), (60.32, 98.23, -60.82)),
    ((128, 128, 128), (53.59, 0.0, 0.0)),
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("rgb8,lab", KNOWN, ids=[str(rgb) for rgb, _ in KNOWN])
def test_rgb_to_lab_known_values(rgb8, lab):
    got = rgb_to_lab(np.array(rgb8, dtype=np.float64) / 255.0)
    np.testing.assert_allclose(got, lab, atol=0.011)


def test_known_values_in_one_batch_and_back():
    """The same table as one (3, 3, 3) array: batched conversion, and LAB -> sRGB gives the 8-bit colors."""
    rgb = np.array([rgb for rgb, _ in KNOWN], dtype=np.float64).reshape(3, 3, 3) / 255.0
    lab = np.array([lab for _, lab in KNOWN]).reshape(3, 3, 3)
    got = rgb_to_lab(rgb)
    assert got.shape == (3, 3, 3)
    np.testing.assert_allclose(got, lab, atol=0.011)
    np.testing.assert_array_equal(np.round(lab_to_rgb(lab) * 255.0), rgb * 255.0)  # back to the same 8-bit colors


def test_grays_have_no_chroma_and_rising_lightness():
    levels = np.arange(256, dtype=np.float64) / 255.0
    lab = rgb_to_lab(np.repeat(levels[:, None], 3, axis=1))
    assert np.abs(lab[:, 1:]).max() < 1e-6
    assert np.all(np.diff(lab[:, 0]) > 0)
    assert lab[0, 0] == pytest.approx(0.0, abs=1e-9) and lab[-1, 0] == pytest.approx(100.0, abs=1e-4)


def test_round_trip_random_colors(rng):
    rgb = rng.uniform(0, 1, (1000, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-9)
    # both branches of the sRGB curve and of CIE's cube root: very dark colors too
    dark = rng.uniform(0, 0.03, (200, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(dark)), dark, atol=1e-9)


def test_round_trip_image_shaped_float32(rng):
    """float32 (N, H, W, 3), as the data pipeline uses: dtype kept, close to the float64 answer."""
    rgb = rng.uniform(0, 1, (2, 5, 7, 3)).astype(np.float32)
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape and lab.dtype == np.float32
    np.testing.assert_allclose(lab, rgb_to_lab(rgb.astype(np.float64)), atol=2e-3)
    np.testing.assert_allclose(lab_to_rgb(lab), rgb, atol=1e-4)


def test_out_of_gamut_lab_is_clipped_into_rgb_range():
    lab = np.array([[50.0, 127.0, -127.0], [100.0, -128.0, 127.0], [0.0, 100.0, 100.0], [120.0, 0.0, 0.0]])
    rgb = lab_to_rgb(lab)
    assert np.all(np.isfinite(rgb)) and rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_every_srgb_color_scales_into_unit_range():
    """L/50 - 1 and ab/110 keep every sRGB color (here a 52^3 grid incl. the cube's corners) in [-1, 1]."""
    steps = np.arange(0, 256, 5, dtype=np.float64) / 255.0
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = rgb_to_lab(grid)
    lightness, ab = scale_lightness(lab[:, 0]), scale_ab(lab[:, 1:])
    assert lightness.min() >= -1.0 and lightness.max() <= 1.0
    assert np.abs(ab).max() <= 1.0
    assert np.abs(ab).max() > 0.9  # the scale is not wastefully loose: blue reaches |b| = 107.9 / 110
    assert AB_SCALE == pytest.approx(110.0)


def test_scaling_endpoints_and_inverses(rng):
    assert scale_lightness(np.float64(0.0)) == -1.0
    assert scale_lightness(np.float64(50.0)) == 0.0
    assert scale_lightness(np.float64(100.0)) == 1.0
    assert scale_ab(np.array([110.0, -110.0])).tolist() == [1.0, -1.0]
    L = rng.uniform(0, 100, 50)
    ab = rng.uniform(-110, 110, (50, 2))
    np.testing.assert_allclose(unscale_lightness(scale_lightness(L)), L, atol=1e-12)
    np.testing.assert_allclose(unscale_ab(scale_ab(ab)), ab, atol=1e-12)


def test_lab_from_parts(rng):
    L = rng.uniform(0, 100, (2, 3, 4))
    ab = rng.uniform(-50, 50, (2, 3, 4, 2))
    for lightness in (L, L[..., None]):
        lab = lab_from_parts(lightness, ab)
        assert lab.shape == (2, 3, 4, 3)
        np.testing.assert_array_equal(lab[..., 0], L)
        np.testing.assert_array_equal(lab[..., 1:], ab)


def test_round_trip_at_the_srgb_curve_knee_is_off_by_at_most_the_specs_own_gap():
    rgb = np.full((1, 3), 0.04045)  # where the linear segment hands over to the power curve
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=4e-8)
