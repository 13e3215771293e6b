"""Property tests (hypothesis): color conversions, shapes through every layer, and colorizing
random small images of every common mode keeps their size, lightness and alpha."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from nanocolor.color import AB_SCALE, fit_to_gamut, in_gamut, lab_to_linear_rgb, lab_to_rgb, rgb_to_lab
from nanocolor.infer import colorize_array, colorize_file
from nanocolor.layers import Conv2d, MaxPool2d, ReLU, Tanh, Upsample2d
from nanocolor.model import ColorNet

# Largest change of L* when an sRGB color is rounded to 8 bits: sum_i |dL*/dc_i| peaks at ~130 per
# unit (dark grays, L* ~ 8, where the sRGB curve is already steep and L* is still linear in Y),
# times half a step, 0.5 / 255 = 0.256. test_rounding_to_8_bits_moves_lightness_by_at_most_L8_TOL
# checks it.
L8_TOL = 0.26

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
unit = st.floats(0.0, 1.0, allow_nan=False)


def rgb_arrays(max_n: int = 40):
    return arrays(np.float64, st.tuples(st.integers(1, max_n), st.just(3)), elements=unit)


# -- color -----------------------------------------------------------------------------------------

@FEW
@given(rgb_arrays())
def test_rgb_lab_round_trip_and_ranges(rgb):
    lab = rgb_to_lab(rgb)
    assert np.all(lab[:, 0] >= -1e-9) and np.all(lab[:, 0] <= 100 + 1e-9)
    assert np.all(np.abs(lab[:, 1:]) < AB_SCALE)  # so scaled a*b* fit the network's tanh range
    # 1e-7: the sRGB curve's two pieces miss each other by 3e-8 at the knee (0.04045)
    np.testing.assert_allclose(lab_to_rgb(lab), rgb, atol=1e-7)
    assert np.all(in_gamut(lab, tol=1e-7))


@FEW
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.just(3)),
              elements=st.floats(-300, 300, allow_nan=False)))
def test_lab_to_rgb_always_lands_in_the_unit_cube(lab):
    rgb = lab_to_rgb(lab)
    assert rgb.shape == lab.shape and np.all(rgb >= 0) and np.all(rgb <= 1)


@FEW
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(-250, 250), st.floats(-250, 250)), min_size=1, max_size=40))
def test_fit_to_gamut_keeps_lightness_and_hue_and_goes_as_far_as_it_can(colors):
    lab = np.array(colors, dtype=np.float64)
    fitted = fit_to_gamut(lab)
    assert np.all(in_gamut(fitted))
    np.testing.assert_array_equal(fitted[:, 0], lab[:, 0])  # L* untouched
    inside = in_gamut(lab)
    np.testing.assert_array_equal(fitted[inside], lab[inside])  # colors already shown as they are
    # a*b* only shrinks, along its own direction: fitted = s * ab with s in [0, 1]
    norm = np.hypot(lab[:, 1], lab[:, 2])
    s = np.where(norm > 0, np.hypot(fitted[:, 1], fitted[:, 2]) / np.maximum(norm, 1e-300), 1.0)
    assert np.all(s <= 1) and np.all(s >= 0)
    np.testing.assert_allclose(fitted[:, 1:], s[:, None] * lab[:, 1:], atol=1e-9)
    # ... and no further than needed: a little more chroma would leave the gamut
    more = lab.copy()
    more[:, 1:] = np.minimum(s + 1e-6, 1.0)[:, None] * lab[:, 1:]
    assert not np.any(in_gamut(more)[~inside])
    assert np.all(lab_to_linear_rgb(fitted) >= -1e-9) and np.all(lab_to_linear_rgb(fitted) <= 1 + 1e-9)


@FEW
@given(rgb_arrays(200))
def test_rounding_to_8_bits_moves_lightness_by_at_most_L8_TOL(rgb):
    rounded = np.round(rgb * 255) / 255
    assert np.abs(rgb_to_lab(rounded)[:, 0] - rgb_to_lab(rgb)[:, 0]).max() <= L8_TOL


def test_L8_TOL_bounds_the_steepest_lightness_slope():
    """sum_i |dL*/dc_i| * (0.5 / 255) over a dense grid of colors, including every 8-bit gray."""
    levels = np.linspace(0, 1, 49)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    grays = np.repeat(np.linspace(0, 1, 2041)[:, None], 3, axis=1)
    colors = np.concatenate([grid, grays])
    h = 1e-6
    slope = sum(np.abs(rgb_to_lab(np.clip(colors + h * e, 0, 1))[:, 0]
                       - rgb_to_lab(np.clip(colors - h * e, 0, 1))[:, 0]) / (2 * h) for e in np.eye(3))
    worst = slope.max() * 0.5 / 255
    assert 0.2 < worst <= L8_TOL  # close to the bound, so the tolerance is not loose


# -- shapes through every layer ------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4))


@FEW
@given(shapes, st.integers(1, 4), st.sampled_from([1, 3, 5]), st.sampled_from([np.float32, np.float64]))
def test_conv_shapes(shape, filters, kernel, dtype):
    N, H, W, C = shape
    conv = Conv2d(C, filters, kernel, rng=np.random.default_rng(0), dtype=dtype)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    out = conv.forward(x)
    assert out.shape == (N, H, W, filters) and out.dtype == dtype
    dx = conv.backward(np.ones_like(out))
    assert dx.shape == x.shape and dx.dtype == dtype
    for name, p in conv.params.items():
        assert conv.grads[name].shape == p.shape


@FEW
@given(shapes, st.sampled_from(["maxpool", "upsample", "relu", "tanh"]))
def test_resampling_and_activation_shapes(shape, kind):
    N, H, W, C = shape
    layer = {"maxpool": MaxPool2d, "upsample": Upsample2d, "relu": ReLU, "tanh": Tanh}[kind]()
    x = np.random.default_rng(2).standard_normal(shape)
    out = layer.forward(x)
    expected = {"maxpool": (N, H // 2, W // 2, C), "upsample": (N, 2 * H, 2 * W, C)}.get(kind, shape)
    assert out.shape == expected
    dx = layer.backward(np.ones_like(out))
    assert dx.shape == x.shape
    if kind == "maxpool":  # each window routes its one gradient to one input; odd edges get none
        assert dx.sum() == out.size and np.all(dx[:, 2 * (H // 2):] == 0) and np.all(dx[:, :, 2 * (W // 2):] == 0)


@FEW
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))
def test_colornet_shapes_for_odd_multiples_of_its_factor(widths, batch, h_odd, w_odd):
    model = ColorNet(tuple(widths), seed=0, arch="seed").train()
    f = model.downsample_factor
    H, W = f * (2 * h_odd - 1), f * (2 * w_odd - 1)
    lightness = np.random.default_rng(3).uniform(-1, 1, (batch, H, W, 1)).astype(np.float32)
    ab = model.forward(lightness)
    assert ab.shape == (batch, H, W, 2) and np.all(np.abs(ab) <= 1)
    model.backward(np.ones_like(ab))
    for layer in model.param_layers:
        for name, p in layer.params.items():
            assert layer.grads[name].shape == p.shape
    if f > 1:
        with pytest.raises(ValueError, match="downsampling factor"):
            model.forward(lightness[:, :H - 1])


# -- colorize on random images of random modes -----------------------------------------------------

def saturated_model() -> ColorNet:
    """A tiny net whose last conv is scaled up, so it predicts extreme, mostly out-of-gamut a*b*."""
    model = ColorNet((4, 8), seed=1, arch="seed")
    last = model.param_layers[-1]
    last.params["W"] *= 40
    last.params["b"] += np.array([0.5, -0.5], dtype=np.float32)
    return model


SATURATED = saturated_model()
MODES = ["L", "RGB", "RGBA", "P", "P_transparent", "I;16", "LA"]


@st.composite
def images(draw):
    """(PIL image, expected RGB in [0, 1], expected alpha or None) for a random mode and size."""
    mode = draw(st.sampled_from(MODES))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    if mode == "I;16":
        levels = rng.integers(0, 65536, (h, w)).astype(np.uint16) >> draw(st.integers(0, 15))  # dark ones too
        return Image.fromarray(levels), np.repeat(levels[..., None] / 65535.0, 3, axis=-1), None
    if mode == "L":
        return Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=-1) / 255.0, None
    if mode == "LA":
        img = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
        return img, np.repeat(rgb[..., :1], 3, axis=-1) / 255.0, alpha
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb / 255.0, alpha
    if mode.startswith("P"):
        img = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        index = np.asarray(img)
        if mode == "P_transparent":
            img.info["transparency"] = int(index[0, 0])
            return img, np.asarray(img.convert("RGB")) / 255.0, np.where(index == index[0, 0], 0, 255)
        return img, np.asarray(img.convert("RGB")) / 255.0, None
    return Image.fromarray(rgb), rgb / 255.0, None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images(), st.sampled_from([4, 8, 16]))
def test_colorize_keeps_size_lightness_and_alpha(image, work_size):
    img, expected_rgb, expected_alpha = image
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.png", Path(tmp) / "out.png"
        img.save(src, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
        colorize_file(SATURATED, src, out, work_size)
        with Image.open(out) as result:
            assert result.size == img.size
            pixels = np.asarray(result)
    assert pixels.shape[-1] == (4 if expected_alpha is not None else 3)
    if expected_alpha is not None:
        np.testing.assert_array_equal(pixels[..., 3], expected_alpha)
    dL = np.abs(rgb_to_lab(pixels[..., :3] / 255.0)[..., 0] - rgb_to_lab(expected_rgb)[..., 0])
    assert dL.max() <= L8_TOL


def test_without_gamut_mapping_the_saturated_model_would_change_lightness():
    """The L* check above can fail: clipping RGB instead of shrinking a*b* moves L* by far more."""
    gray = np.random.default_rng(4).uniform(0.2, 0.8, (12, 12, 3))
    L = rgb_to_lab(gray)[..., 0]
    colorized = colorize_array(SATURATED, gray, 8)
    assert np.abs(rgb_to_lab(colorized)[..., 0] - L).max() < 1e-6
    import nanocolor.infer as infer
    original = infer.fitted_rgb
    try:
        infer.fitted_rgb = lab_to_rgb  # plain clipping in lab_to_rgb
        clipped = colorize_array(SATURATED, gray, 8)
    finally:
        infer.fitted_rgb = original
    assert np.abs(rgb_to_lab(clipped)[..., 0] - L).max() > 5
