"""Pictures: float RGB to 8-bit, gray versions, side-by-side panels, PNG bytes and files.

Shape legend: H, W = height, width; RGB images are float (H, W, 3) in [0, 1] unless named uint8.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, PngImagePlugin

from . import png
from .color import lab_to_rgb, rgb_to_lab
from .serialize import atomic_write_bytes

# PNG text key that marks the files colorize writes, so that a later run can recognise them.
OUTPUT_KEY = "nanocolor"


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> uint8, rounded to the nearest level (uint8 already: returned as it is)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return rgb
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


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


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None = None, note: str | None = None) -> bytes:
    """RGB (H, W, 3) in [0, 1] (or uint8) and optional alpha uint8 (H, W) -> the bytes of an 8-bit
    PNG, compressed in row bands on the CPU workers (png.py); a note is stored under OUTPUT_KEY,
    marking the file as colorize's output."""
    pixels = to_uint8(rgb)
    if alpha is not None:
        pixels = np.dstack([pixels, alpha])
    return png.encode(pixels, {OUTPUT_KEY: note} if note is not None else None)


def png_bytes(img: Image.Image, note: str | None = None) -> bytes:
    """The bytes of `img` as a PNG, with `note` (if any) in a text chunk under OUTPUT_KEY."""
    info = None
    if note is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(OUTPUT_KEY, note)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, picture: Image.Image, note: str | None = None) -> None:
    """Save `picture` as a PNG file at `path`, atomically (never half a file)."""
    atomic_write_bytes(path, png_bytes(picture, note))
