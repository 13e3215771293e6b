"""Image quality numbers for colorization.

psnr: on 8-bit RGB. auc: Zhang et al. (2016), share of pixels whose ab error is within t LAB
units, averaged over t = 0..150. colorfulness: Hasler & Suesstrunk (2003).
"""
from __future__ import annotations

import numpy as np

from .color import rgb_to_lab


def psnr(rgb_pred: np.ndarray, rgb_true: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images on the same 0..peak scale."""
    mse = float(np.mean((np.asarray(rgb_pred, np.float64) - np.asarray(rgb_true, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def auc(ab_pred: np.ndarray, ab_true: np.ndarray, max_threshold: int = 150) -> float:
    """Area under the cumulative ab-error curve, in [0, 1]; ab in LAB units, shape (..., 2)."""
    err = np.sqrt(np.sum((np.asarray(ab_pred, np.float64) - np.asarray(ab_true, np.float64)) ** 2, axis=-1)).ravel()
    thresholds = np.arange(max_threshold + 1)
    # share of pixels with err <= t for every t, from one sort instead of 151 passes
    shares = np.searchsorted(np.sort(err), thresholds, side="right") / err.size
    return float(shares.mean())


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colorfulness of an RGB image (..., 3) on the 0..255 scale (0 for gray)."""
    rgb = np.asarray(rgb, np.float64).reshape(-1, 3)
    rg = rgb[:, 0] - rgb[:, 1]
    yb = 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


METRIC_NAMES = ("psnr", "auc", "colorfulness")


def colorization_scores(rgb_out: np.ndarray, rgb_true: np.ndarray) -> dict:
    """Scores of one colorized photo against its original, both 8-bit RGB (H, W, 3) as saved.

    AuC compares the a*b* of the two 8-bit images, so gamut mapping and rounding count too.
    Returns {"psnr", "auc", "colorfulness"} (the last of rgb_out alone).
    """
    ab_out = rgb_to_lab(np.asarray(rgb_out, np.float64) / 255.0)[..., 1:]
    ab_true = rgb_to_lab(np.asarray(rgb_true, np.float64) / 255.0)[..., 1:]
    return {"psnr": psnr(rgb_out, rgb_true), "auc": auc(ab_out, ab_true), "colorfulness": colorfulness(rgb_out)}


def summarize(scores: list, original_colorfulness: list) -> dict:
    """Per-photo score dicts -> their means, plus colorfulness_ratio = mean colorfulness of the
    outputs / mean colorfulness of the originals (1 for the originals themselves, 0 for gray)."""
    summary = {name: float(np.mean([s[name] for s in scores])) for name in METRIC_NAMES}
    reference = float(np.mean(original_colorfulness))
    summary["colorfulness_ratio"] = summary["colorfulness"] / reference if reference > 0 else float("nan")
    return summary
