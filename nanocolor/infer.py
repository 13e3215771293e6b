"""Colorizing photos of any size with a trained model, and side-by-side pictures.

The network runs at a small working size (the longer side, rounded to its downsampling
factor); its ab prediction is upsampled to the full image and joined with the input's own
full-resolution lightness, so fine detail comes from the photo and only color from the net.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import backend
from .color import lab_to_rgb, rgb_to_lab, scale_lightness, unscale_ab
from .model import ColorNet


def working_shape(height: int, width: int, work_size: int, factor: int) -> tuple[int, int]:
    """(h, w) with the longer side near work_size, aspect kept, both multiples of factor."""
    scale = work_size / max(height, width)
    h = max(factor, int(round(height * scale / factor)) * factor)
    w = max(factor, int(round(width * scale / factor)) * factor)
    return h, w


def _resize_channels(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of float (h, w, C) to (height, width, C), one PIL 'F' image per channel."""
    return np.stack([np.asarray(Image.fromarray(a[..., c].astype(np.float32), "F")
                                .resize((width, height), Image.Resampling.BILINEAR))
                     for c in range(a.shape[-1])], axis=-1)


def predict_ab(model: ColorNet, L: np.ndarray, work_size: int) -> np.ndarray:
    """Lightness L* (H, W) in [0, 100] -> predicted a*b* (H, W, 2) in LAB units."""
    H, W = L.shape
    h, w = working_shape(H, W, work_size, model.downsample_factor)
    small = _resize_channels(L[..., None], h, w)
    lightness = backend.xp.asarray(scale_lightness(small)[None].astype(np.float32))
    ab_scaled = backend.to_numpy(model.forward(lightness))[0]
    return _resize_channels(unscale_ab(ab_scaled), H, W)


def colorize_array(model: ColorNet, rgb: np.ndarray, work_size: int) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] (its color is ignored) -> colorized RGB (H, W, 3) in [0, 1]."""
    lab = rgb_to_lab(rgb.astype(np.float64))
    L = lab[..., 0]
    ab = predict_ab(model, L.astype(np.float32), work_size)
    return lab_to_rgb(np.concatenate([L[..., None], ab.astype(np.float64)], axis=-1))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(rgb) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """The lightness of an RGB image, shown as a gray RGB image (a = b = 0)."""
    lab = rgb_to_lab(rgb.astype(np.float64))
    lab[..., 1:] = 0
    return lab_to_rgb(lab)


def side_by_side(rows: list[tuple[np.ndarray, ...]], gap: int = 4) -> Image.Image:
    """Rows of equally sized RGB images in [0, 1] -> one picture, white gaps between cells.

    Each row is usually (grayscale, ground truth, colorized).
    """
    h, w = rows[0][0].shape[:2]
    cols = len(rows[0])
    canvas = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = to_uint8(img)
    return Image.fromarray(canvas)
