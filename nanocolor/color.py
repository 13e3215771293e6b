"""sRGB <-> CIE LAB (D65 white), written out by hand, and the network's scaling of L and ab.

The network sees lightness L in [0, 100] scaled to [-1, 1] (L / 50 - 1) and predicts the chroma
channels a, b divided by AB_SCALE = 110, so every sRGB color (|a|, |b| < 108) lands in [-1, 1].
Arrays hold channels last: rgb (..., 3) in [0, 1], lab (..., 3) as (L*, a*, b*).
"""
from __future__ import annotations

import numpy as np

from .backend import array_module

AB_SCALE = 110.0
RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
# XYZ of the D65 reference white, (0.95047, 1.0, 1.08883) to 7 digits; taken as the image of
# sRGB white under the matrix above, so white maps to exactly L* = 100 and every gray to a = b = 0.
WHITE_D65 = tuple(RGB_TO_XYZ.sum(axis=1))
XYZ_TO_RGB = np.linalg.inv(RGB_TO_XYZ)
_DELTA = 6 / 29  # where CIE's cube root hands over to a straight line


def _srgb_to_linear(c):
    xp = array_module(c)
    return xp.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    xp = array_module(c)
    c = xp.clip(c, 0, 1)
    return xp.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb):
    """sRGB in [0, 1], shape (..., 3) -> CIE L*a*b*, shape (..., 3)."""
    xp = array_module(rgb)
    linear = _srgb_to_linear(rgb)
    xyz = linear @ xp.asarray(RGB_TO_XYZ.T, dtype=linear.dtype)
    t = xyz / xp.asarray(WHITE_D65, dtype=linear.dtype)
    f = xp.where(t > _DELTA ** 3, xp.cbrt(t), t / (3 * _DELTA ** 2) + 4 / 29)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return xp.stack([L, a, b], axis=-1)


def _cie_f(t):
    """CIE's f: the cube root, with a straight line near 0."""
    xp = array_module(t)
    return xp.where(t > _DELTA ** 3, xp.cbrt(t), t / (3 * _DELTA ** 2) + 4 / 29)


# Linear light of each 8-bit sRGB level, computed in float64 and stored in float32.
_LINEAR_OF_LEVEL = _srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


def lightness(rgb):
    """CIE L* of sRGB (..., 3): floats in [0, 1] (L* in their dtype) or uint8 levels (L* in
    float32, the levels looked up in a float64-made table). The L* of rgb_to_lab, alone."""
    xp = array_module(rgb)
    if rgb.dtype == xp.uint8:
        linear = xp.asarray(_LINEAR_OF_LEVEL)[rgb]
    else:
        linear = _srgb_to_linear(rgb)
    r, g, b = (float(c) / WHITE_D65[1] for c in RGB_TO_XYZ[1])
    y = linear[..., 0] * r
    y += linear[..., 1] * g
    y += linear[..., 2] * b
    return 116 * _cie_f(y) - 16


def lab_to_linear_rgb(lab):
    """CIE L*a*b*, shape (..., 3) -> linear-light RGB, shape (..., 3), unclipped.

    A channel outside [0, 1] means the color lies outside the sRGB gamut.
    """
    xp = array_module(lab)
    fy = (lab[..., 0] + 16) / 116
    f = xp.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    t = xp.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29))
    xyz = t * xp.asarray(WHITE_D65, dtype=lab.dtype)
    return xyz @ xp.asarray(XYZ_TO_RGB.T, dtype=lab.dtype)


def lab_to_rgb(lab):
    """CIE L*a*b*, shape (..., 3) -> sRGB in [0, 1], shape (..., 3) (out-of-gamut colors clipped)."""
    return _linear_to_srgb(lab_to_linear_rgb(lab))


def in_gamut(lab, tol: float = 1e-9):
    """Boolean mask (...,): which L*a*b* colors (..., 3) an sRGB display can show."""
    return _linear_in_gamut(lab_to_linear_rgb(lab), tol)


def _linear_in_gamut(linear, tol: float = 1e-9):
    return ((linear >= -tol) & (linear <= 1 + tol)).all(axis=-1)


def fit_to_gamut(lab, steps: int = 30):
    """Bring out-of-gamut colors (..., 3) into sRGB by shrinking a*b* toward 0 at fixed L*.

    Clipping RGB instead would change the lightness. Hue is kept: a*b* is only scaled, by the
    largest factor in [0, 1] that stays in gamut (bisection, 2**-steps precise, run only on the
    out-of-gamut colors). A gray (a* = b* = 0) with L* in [0, 100] is always in gamut.
    """
    lab = lab.copy()
    outside = ~in_gamut(lab)
    if bool(outside.any()):
        lab[outside] = _shrink_into_gamut(lab[outside], steps)
    return lab


def fitted_rgb(lab, steps: int = 30):
    """lab_to_rgb(fit_to_gamut(lab, steps)), the same values, with the color matrix applied once
    to the colors already in gamut (most of them): sRGB (..., 3) in [0, 1] of lab (..., 3)."""
    linear = lab_to_linear_rgb(lab)
    outside = ~_linear_in_gamut(linear)
    if bool(outside.any()):
        linear[outside] = lab_to_linear_rgb(_shrink_into_gamut(lab[outside], steps))
    return _linear_to_srgb(linear)


def _shrink_into_gamut(lab, steps: int):
    """fit_to_gamut's bisection on out-of-gamut colors (N, 3) -> the fitted colors (N, 3)."""
    xp = array_module(lab)
    L, ab = lab[:, :1], lab[:, 1:]
    lo = xp.zeros_like(L)  # a scale known to be in gamut
    hi = xp.ones_like(L)   # a scale known to be out of gamut
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = in_gamut(xp.concatenate([L, ab * mid], axis=-1))[:, None]
        lo, hi = xp.where(ok, mid, lo), xp.where(ok, hi, mid)
    return xp.concatenate([L, ab * lo], axis=-1)


def scale_lightness(L):
    """L* in [0, 100] -> network input in [-1, 1]."""
    return L / 50.0 - 1.0


def unscale_lightness(lightness):
    return (lightness + 1.0) * 50.0


def scale_ab(ab):
    """a*, b* in LAB units -> network target in [-1, 1]."""
    return ab / AB_SCALE


def unscale_ab(ab_scaled):
    return ab_scaled * AB_SCALE


def lab_from_parts(L, ab):
    """L* (..., 1) or (...,) and a*b* (..., 2) in LAB units -> lab (..., 3)."""
    xp = array_module(ab)
    if L.ndim == ab.ndim - 1:
        L = L[..., None]
    return xp.concatenate([L, ab], axis=-1)
