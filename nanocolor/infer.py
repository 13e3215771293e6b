"""Colorizing photos of any size with a trained model.

The network runs at a small working size (the longer side, rounded to its downsampling
factor); its ab prediction is upsampled to the full image and joined with the input's own
full-resolution lightness, so fine detail comes from the photo and only color from the net.
Predicted colors that sRGB cannot show are pulled into gamut at fixed lightness, so the output's
L* is the input's, up to 8-bit rounding. Pictures and PNG bytes are made by images.py.

Only the network works at the small size; everything at full resolution (lightness, upsampling
a*b*, gamut fitting, sRGB, 8 bits, PNG compression) runs in row bands of BAND_PIXELS pixels over
the CPU workers (engine.map_tasks), in float32, so memory beyond the photo's own pixels
is a few bytes per pixel plus a few bands: 8-bit input (3 bytes a pixel), its L* (4), the 8-bit
output (3) and its PNG.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import backend, engine
from .color import fitted_rgb, lightness, scale_lightness, unscale_ab
from .data import HIGH_BIT_MODES, ImageError, alpha_channel, open_image, rgb_array, to_rgb
from .images import OUTPUT_KEY, encode_png, gray_of, png_bytes, side_by_side, to_uint8
from .model import ColorNet
from .options import check_number
from .serialize import CorruptFileError, atomic_write_bytes, load_npz


# Longest side the network may run at: its memory grows with the square (about 1.1 GB at 1024
# for the shipped model, 4 GB at 2048), while color is smooth and gains little from more pixels.
MAX_WORK_SIZE = 1024


def check_work_size(work_size: int | None) -> None:
    """ValueError unless work_size is None (the model's default) or 1 to MAX_WORK_SIZE."""
    check_number("--work-size", work_size, low=1)
    if work_size is not None and work_size > MAX_WORK_SIZE:
        raise ValueError(f"--work-size must be at most {MAX_WORK_SIZE}, got {work_size}: the network's "
                         f"memory grows with its square (about 1 GB at {MAX_WORK_SIZE})")


def working_shape(height: int, width: int, work_size: int, factor: int) -> tuple[int, int]:
    """(h, w) with the longer side near work_size, aspect kept, both multiples of factor (at least
    factor); never above the photo's own size, up to that rounding: more pixels add no detail."""
    scale = min(work_size, max(height, width)) / max(height, width)
    h = max(factor, int(round(height * scale / factor)) * factor)
    w = max(factor, int(round(width * scale / factor)) * factor)
    return h, w


BAND_PIXELS = 1 << 17  # pixels per band of full-resolution work: ~10 MB of float32 temporaries


def _resize_channels(a: np.ndarray, height: int, width: int, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinear resize of float (h, w, C) to (height, width, C), one PIL 'F' image per channel;
    with rows = (y0, y1), only those output rows, (y1 - y0, width, C), the same values."""
    y0, y1 = rows or (0, height)
    h, w = a.shape[:2]
    box = (0, y0 * h / height, w, y1 * h / height)  # the source region those rows sample, same scale
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c], dtype=np.float32), "F")
                                .resize((width, y1 - y0), Image.Resampling.BILINEAR, box=box))
                     for c in range(a.shape[-1])], axis=-1)


def _over_bands(task, height: int, width: int) -> None:
    """task(y0, y1) for bands of about BAND_PIXELS pixels covering rows 0..height, on the CPU workers."""
    step = max(1, BAND_PIXELS // max(width, 1))
    bands = [(y, min(height, y + step)) for y in range(0, height, step)]
    engine.map_tasks()(lambda i: task(*bands[i]), len(bands))


def working_lightness(model: ColorNet, L: np.ndarray, work_size: int) -> np.ndarray:
    """Lightness L* (H, W) -> L* (h, w) at the network's working size (longer side near work_size)."""
    H, W = L.shape
    h, w = working_shape(H, W, work_size, model.downsample_factor)
    return _resize_channels(L[..., None], h, w)[..., 0]


def predict_small_ab(model: ColorNet, L: np.ndarray, work_size: int) -> np.ndarray:
    """Lightness L* (H, W) in [0, 100] -> predicted a*b* (h, w, 2) in LAB units at the working size
    (chroma gain applied)."""
    return predict_working_ab(model, working_lightness(model, L, work_size))


def predict_working_ab(model: ColorNet, small: np.ndarray, gains: tuple | None = None):
    """L* (h, w) already at the working size -> predicted a*b* (h, w, 2) in LAB units (chroma gain
    applied, times the kind head's factor for this photo where the net has one); with `gains`, a
    list of them, one per chroma gain, from one pass of the network."""
    lightness_in = backend.xp.asarray(scale_lightness(small)[None, ..., None].astype(np.float32))
    net = engine.network(model)
    out = net.forward(lightness_in)
    if model.config.get("head", "tanh") == "logits":  # bin logits -> a*b* by the annealed mean
        from .classify import annealed_mean
        ab = backend.to_numpy(annealed_mean(out))[0]
    elif model.class_head is not None:  # the a*b* head's and the class head's a*b*, blended
        from .classify import blended_ab
        ab = backend.to_numpy(blended_ab(out, **model.decode))[0]
    else:
        ab = unscale_ab(backend.to_numpy(out)[0])
    factor = 1.0  # without a kind head; with one, from the encoder's maps of the same pass
    if model.kind_head is not None:
        factor = float(backend.to_numpy(model.kind_head.photo_gains(net.encoded))[0])
    if gains is not None:
        return [(ab * gain * factor).astype(np.float32) for gain in gains]
    return (ab * model.chroma_gain * factor).astype(np.float32)


def predict_ab(model: ColorNet, L: np.ndarray, work_size: int) -> np.ndarray:
    """Lightness L* (H, W) in [0, 100] -> predicted a*b* (H, W, 2) in LAB units."""
    H, W = L.shape
    return _resize_channels(predict_small_ab(model, L, work_size), H, W)


def full_lightness(rgb: np.ndarray, dtype=np.float32) -> np.ndarray:
    """L* (H, W) in `dtype` of RGB (H, W, 3) in [0, 1] or uint8, band by band on the CPU workers
    (float32 from uint8: a table lookup of each level's linear light, made in float64)."""
    H, W = rgb.shape[:2]
    L = np.empty((H, W), dtype=dtype)

    def band(y0: int, y1: int) -> None:
        part = rgb[y0:y1]
        if part.dtype == np.uint8 and dtype != np.float32:
            part = part / 255.0
        L[y0:y1] = lightness(part if part.dtype == np.uint8 else part.astype(dtype))

    _over_bands(band, H, W)
    return L


def colorize_array(model: ColorNet, rgb: np.ndarray, work_size: int, out_dtype=np.float64) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] or uint8 (its color is ignored) -> colorized RGB (H, W, 3), same L*.

    out_dtype float64 (default): in [0, 1], computed in float64 (L* kept to 1e-6); float32: computed
    in float32 (to ~1e-4); uint8: 8-bit levels, computed in float32 and rounded band by band (the
    8-bit L* bound of 0.26 holds: float32's error is far below half a level).
    """
    work = np.float64 if np.dtype(out_dtype) == np.float64 else np.float32
    L = full_lightness(rgb, work)
    return join_color(L, predict_small_ab(model, L, work_size), out_dtype)


def join_color(L: np.ndarray, ab_small: np.ndarray, out_dtype=np.float64) -> np.ndarray:
    """Full-resolution L* (H, W) and a*b* (h, w, 2) at the working size -> RGB (H, W, 3) in out_dtype
    (as colorize_array gives it): a*b* upsampled, pulled into gamut at fixed L*, band by band."""
    H, W = L.shape
    work = L.dtype
    ab_small = ab_small.astype(work)
    out = np.empty((H, W, 3), dtype=out_dtype)

    def band(y0: int, y1: int) -> None:
        ab = _resize_channels(ab_small, H, W, rows=(y0, y1)).astype(work, copy=False)
        colors = fitted_rgb(np.concatenate([L[y0:y1, :, None], ab], axis=-1))
        out[y0:y1] = to_uint8(colors) if out.dtype == np.uint8 else colors

    _over_bands(band, H, W)
    return out


def read_pixels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image file -> RGB (H, W, 3), uint8 for 8-bit images (float32 in [0, 1] for 16-bit
    and float ones, as read_photo gives them), and its alpha, uint8 (H, W) or None."""
    img = open_image(path)
    try:
        if img.mode in HIGH_BIT_MODES:
            return rgb_array(img), None
        return np.asarray(img if img.mode == "RGB" else to_rgb(img)), alpha_channel(img)
    except MemoryError:
        raise ImageError(f"{path}: not enough memory for a {img.width}x{img.height} image") from None
    except (ValueError, OSError) as err:
        raise ImageError(f"{path}: cannot convert a {img.mode} image to RGB ({err})") from None


SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"  # the weight files that come with nanocolor
DEFAULT_WEIGHTS = SHIPPED_WEIGHTS / "colornet.npz"


def weights_file(name: str | os.PathLike) -> Path:
    """The weights `name` stands for: a file path, or the name of a shipped file without its
    .npz ("colornet-v1": nanocolor/weights/colornet-v1.npz) when no such path exists."""
    path = Path(name)
    shipped = SHIPPED_WEIGHTS / f"{name}.npz"
    if not path.exists() and path.name == str(name) and shipped.is_file():
        return shipped
    return path


def load_colorizer(path: str | os.PathLike) -> tuple[ColorNet, int]:
    """A model for colorize_array from a weights file or checkpoint (or a shipped file's name,
    weights_file), and its default work size: the one stored with the weights (chosen on
    validation photos), else twice its training size. Raises CorruptFileError, naming the file,
    for anything unusable."""
    path = weights_file(path)
    try:
        arrays, meta = load_npz(path)
        model = ColorNet.from_contents(arrays, meta, source=str(path))
    except CorruptFileError:
        raise
    except Exception as err:  # e.g. arrays of a type no parameter can take
        raise CorruptFileError(f"{path}: cannot build a model from it ({err.__class__.__name__}: {err})") from None
    head = model.config.get("head", "tanh")
    if head == "logits" or model.class_head is not None:  # the bins cost a second to build: only when needed
        from .classify import ab_bins
        bins = len(ab_bins())
    else:
        bins = "the bins'"
    expected = {"tanh": 2, "logits": bins}.get(head)
    if model.config.get("out_channels", 2) != expected or model.config.get("class_bins", 0) not in (0, bins):
        raise CorruptFileError(f"{path}: a {model.config.get('head')!r} model with {model.config.get('out_channels')} "
                               f"outputs; colorizing needs 2 a*b* outputs (tanh) or {bins} bin logits")
    work_size = meta.get("work_size")
    if work_size is not None and not (isinstance(work_size, int) and 1 <= work_size <= MAX_WORK_SIZE):
        raise CorruptFileError(f"{path}: its work size {work_size!r} is not a number of pixels "
                               f"from 1 to {MAX_WORK_SIZE}")
    train_size = meta.get("train_size") or (meta.get("train_config") or {}).get("size") or 64
    return model, work_size or 2 * int(train_size)


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


def check_not_input(path: str | os.PathLike, *outputs: str | os.PathLike | None) -> None:
    """FileExistsError when an output path (None: none) is the input file itself."""
    for out in outputs:
        if out and Path(out).resolve() == Path(path).resolve():
            raise FileExistsError(errno.EEXIST, "it is the input itself; refusing to overwrite it", str(out))


def colorize_file(model: ColorNet, path: str | os.PathLike, out_path: str | os.PathLike, work_size: int,
                  compare_path: str | os.PathLike | None = None) -> None:
    """Colorize one image file into a PNG at out_path (alpha kept), and optionally a
    grayscale | original | colorized picture at compare_path.

    Raises ImageError for an unreadable input and OSError for an unwritable output; each output
    is encoded in memory, then written atomically, so no half-written file ever appears.
    """
    path, out_path = Path(path), Path(out_path)
    check_not_input(path, out_path, compare_path)
    rgb, alpha = read_pixels(path)
    colorized = colorize_array(model, rgb, work_size, out_dtype=np.uint8)
    if not compare_path:
        rgb = None  # the input's pixels are not needed any more
    note = f"colorized from {path.name}"
    atomic_write_bytes(out_path, encode_png(colorized, alpha, note))
    if compare_path:
        atomic_write_bytes(compare_path, compare_png(rgb, colorized, path.name))


def compare_png(rgb: np.ndarray, colorized: np.ndarray, name: str) -> bytes:
    """The PNG bytes of grayscale | original | colorized, for an input (uint8 or in [0, 1]) called `name`."""
    rgb = rgb / 255.0 if rgb.dtype == np.uint8 else rgb
    picture = side_by_side([(gray_of(rgb), rgb, colorized)])
    return png_bytes(picture, f"gray | original | colorized of {name}")


