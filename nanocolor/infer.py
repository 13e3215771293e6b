"""Colorizing photos of any size with a trained model.

The network runs at a small working size (the longer side, rounded to its downsampling
factor); its ab prediction is upsampled to the full image and joined with the input's own
full-resolution lightness, so fine detail comes from the photo and only color from the net.
Predicted colors that sRGB cannot show are pulled into gamut at fixed lightness, so the output's
L* is the input's, up to 8-bit rounding. Pictures and PNG bytes are made by images.py.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import backend
from .classify import ab_bins, annealed_mean
from .color import fit_to_gamut, lab_to_rgb, rgb_to_lab, scale_lightness, unscale_ab
from .data import read_photo
from .images import OUTPUT_KEY, encode_png, gray_of, png_bytes, side_by_side
from .model import ColorNet
from .serialize import CorruptFileError, atomic_write_bytes, load_npz


# Longest side the network may run at: its memory grows with the square (about 1.1 GB at 1024
# for the shipped model, 4 GB at 2048), while color is smooth and gains little from more pixels.
MAX_WORK_SIZE = 1024


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
    out = model.forward(lightness)
    if model.config.get("head", "tanh") == "logits":  # bin logits -> a*b* by the annealed mean
        ab = backend.to_numpy(annealed_mean(out))[0]
    else:
        ab = unscale_ab(backend.to_numpy(out)[0])
    return _resize_channels(ab * model.chroma_gain, H, W)


def colorize_array(model: ColorNet, rgb: np.ndarray, work_size: int) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] (its color is ignored) -> colorized RGB (H, W, 3) in [0, 1], same L*."""
    lab = rgb_to_lab(rgb.astype(np.float64))
    L = lab[..., 0]
    ab = predict_ab(model, L.astype(np.float32), work_size)
    return lab_to_rgb(fit_to_gamut(np.concatenate([L[..., None], ab.astype(np.float64)], axis=-1)))


def load_colorizer(path: str | os.PathLike) -> tuple[ColorNet, int]:
    """A model for colorize_array from a weights file or checkpoint, and its default work size
    (twice its training size). Raises CorruptFileError, naming the file, for anything unusable."""
    if Path(path).is_dir():
        raise CorruptFileError(f"{path}: is a folder; weights are a .npz file (a run's model.npz or checkpoint.npz)")
    try:
        arrays, meta = load_npz(path)
        model = ColorNet.from_contents(arrays, meta, source=str(path))
    except CorruptFileError:
        raise
    except Exception as err:  # e.g. arrays of a type no parameter can take
        raise CorruptFileError(f"{path}: cannot build a model from it ({err.__class__.__name__}: {err})") from None
    expected = {"tanh": 2, "logits": len(ab_bins())}.get(model.config.get("head", "tanh"))
    if model.config.get("out_channels", 2) != expected:
        raise CorruptFileError(f"{path}: a {model.config.get('head')!r} model with {model.config.get('out_channels')} "
                               f"outputs; colorizing needs 2 a*b* outputs (tanh) or {len(ab_bins())} bin logits")
    train_size = meta.get("train_size") or (meta.get("train_config") or {}).get("size") or 64
    return model, 2 * int(train_size)


def is_colorize_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a PNG that colorize_file wrote (it carries the OUTPUT_KEY text chunk)."""
    path = Path(path)
    if path.suffix.lower() != ".png" or not path.is_file():
        return False
    try:
        with Image.open(path) as img:
            return OUTPUT_KEY in img.info
    except Exception:  # unreadable or not a PNG: not ours
        return False


def frame_count(path: str | os.PathLike) -> int:
    """Frames (or pages) in an image file: more than 1 for animated GIF/PNG/WebP and multi-page TIFF."""
    try:
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1))
    except Exception:
        return 1


def colorize_file(model: ColorNet, path: str | os.PathLike, out_path: str | os.PathLike, work_size: int,
                  compare_path: str | os.PathLike | None = None) -> None:
    """Colorize one image file into a PNG at out_path (alpha kept), and optionally a
    grayscale | original | colorized picture at compare_path.

    Raises ImageError for an unreadable input and OSError for an unwritable output; each output
    is encoded in memory, then written atomically, so no half-written file ever appears.
    """
    path, out_path = Path(path), Path(out_path)
    if out_path.resolve() == path.resolve() or (compare_path and Path(compare_path).resolve() == path.resolve()):
        raise FileExistsError(errno.EEXIST, "it is the input itself; refusing to overwrite it", str(out_path))
    rgb, alpha = read_photo(path)
    colorized = colorize_array(model, rgb, work_size)
    note = f"colorized from {path.name}"
    atomic_write_bytes(out_path, encode_png(colorized, alpha, note))
    if compare_path:
        picture = side_by_side([(gray_of(rgb), rgb, colorized)])
        atomic_write_bytes(compare_path, png_bytes(picture, f"gray | original | colorized of {path.name}"))


