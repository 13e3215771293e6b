"""Reading photos from disk and turning them into (lightness, ab) training pairs.

Shape legend: N, S = number of images, square training size; M = crop margin.
    lightness (N, S, S, 1) and ab (N, S, S, 2), float32, both scaled to [-1, 1] (see color.py).
With a crop margin photos are stored at (S + M) x (S + M) and each batch takes a random S x S
window of each (and a mirror image half the time), so the network sees many views of a photo.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .color import rgb_to_lab, scale_ab, scale_lightness
from .progress import progress_bar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# Refuse images above this many pixels (decompression bombs): 100 megapixels, ~300 MB as RGB.
MAX_PIXELS = 100_000_000
# Mean chroma (LAB units) below which a photo counts as gray: nothing to learn from it.
GRAY_CHROMA = 3.0

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, with a clearer message


class ImageError(ValueError):
    """A file is missing, not an image, truncated, or too large. `reason` says which, in a word:
    'missing', 'empty', 'too large', 'not an image' or 'corrupt'."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


class DataError(ValueError):
    """A data folder holds nothing usable for training."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, upright as a viewer shows it (EXIF orientation applied).

    Raises ImageError, naming the file, for anything that is not a decodable image of at most
    MAX_PIXELS pixels; the pixel count is checked from the header, before decoding.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file", "missing")
    if not path.is_file():
        raise ImageError(f"{path}: not a file", "missing")
    return decode_image(path, str(path))


def decode_image(source, name: str, max_pixels: int | None = None) -> Image.Image:
    """open_image for a path or in-memory bytes: `name` labels errors; max_pixels defaults to MAX_PIXELS."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else Path(source).stat().st_size
    if size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)", "empty")
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} pixels is above the limit of "
                                 f"{max_pixels:,} (possible decompression bomb)", "too large")
            img.load()
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or an unsupported format)", "not an image") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode it", "too large") from None
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, ... on bad data
        raise ImageError(f"{name}: cannot decode image ({err.__class__.__name__}: {err})") from None
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored rather than lose the photo
        return img


HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def gray_levels(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float gray image -> float32 (H, W) in [0, 1], at full precision."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # 32-bit ints holding 16- or 8-bit data
    else:
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0  # float data in [0, 1] or [0, 255]
    return np.clip(values / top, 0, 1).astype(np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, palette, 16-bit, float, CMYK, ...) -> 8-bit RGB; alpha is dropped."""
    if img.mode in HIGH_BIT_MODES:
        gray = (gray_levels(img) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def alpha_channel(img: Image.Image) -> np.ndarray | None:
    """The image's alpha channel as uint8 (H, W), or None when it has none."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        return np.asarray(img.getchannel("A"))
    return None


def rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image -> float32 RGB (H, W, 3) in [0, 1]; 16-bit and float grays keep their precision."""
    if img.mode in HIGH_BIT_MODES:
        return np.repeat(gray_levels(img)[..., None], 3, axis=-1)
    return np.asarray(to_rgb(img), dtype=np.float32) / 255.0


def read_photo(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image file -> RGB float32 (H, W, 3) in [0, 1] and its alpha, uint8 (H, W) or None.

    Raises ImageError, naming the file, when it cannot be read or converted.
    """
    return photo_arrays(open_image(path), path)


def photo_arrays(img: Image.Image, path) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded image -> (RGB float32 (H, W, 3) in [0, 1], alpha uint8 (H, W) or None)."""
    try:
        return rgb_array(img), alpha_channel(img)
    except MemoryError:
        raise ImageError(f"{path}: not enough memory for a {img.width}x{img.height} image") from None
    except (ValueError, OSError) as err:
        raise ImageError(f"{path}: cannot convert a {img.mode} image to RGB ({err})") from None


def is_grayscale(rgb: np.ndarray) -> bool:
    """True when a photo (H, W, 3) in [0, 1] has (almost) no color: mean LAB chroma < GRAY_CHROMA."""
    lab = rgb_to_lab(rgb.astype(np.float32))
    return float(np.hypot(lab[..., 1], lab[..., 2]).mean()) < GRAY_CHROMA


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files below `root`, sorted. A Kaggle-style folder with `color/` uses just that."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    if (root / "color").is_dir():
        root = root / "color"  # the `gray/` twin holds the same photos without their color
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def photo_record(roots: list) -> dict:
    """What tells a run's photos apart when their folders move: the number of image files under
    `roots` and a digest of each one's folder number, name below that folder, and size in bytes."""
    digest, count = hashlib.sha256(), 0
    for index, root in enumerate(roots):
        for path in find_images(root):
            digest.update(f"{index}|{path.relative_to(root).as_posix()}|{path.stat().st_size}\n".encode())
            count += 1
    return {"count": count, "sha256": digest.hexdigest()}


def lab_pair(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB (..., 3) in [0, 1] -> scaled lightness (..., 1) and scaled ab (..., 2), float32."""
    lab = rgb_to_lab(rgb.astype(np.float32))
    return scale_lightness(lab[..., :1]), scale_ab(lab[..., 1:])


LOAD_CHUNK = 1024  # photos converted to LAB together (float64 on the way)


def load_dataset(root: str | os.PathLike | list, size: int, limit: int | None = None,
                 progress: bool = True, with_paths: bool = False) -> tuple:
    """Load every color photo under `root` (a folder, or a list of folders), center-cropped and
    resized to size x size.

    Returns lightness (N, S, S, 1) and ab (N, S, S, 2), scaled to [-1, 1], and with `with_paths`
    also the N photos' paths. Unreadable and already-gray images are skipped and counted in one
    warning.
    """
    if size < 1:
        raise ValueError(f"image size must be at least 1 pixel, got {size}")
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    paths = [path for r in roots for path in find_images(r)]
    root = ", ".join(map(str, roots))
    if not paths:
        raise DataError(f"{root}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if limit:
        paths = paths[:limit]
    photos, pairs, kept, unreadable, gray = [], [], [], 0, 0
    bar = progress_bar(len(paths), "loading images", "images", progress)
    for path in paths:
        if len(photos) == LOAD_CHUNK:  # to LAB a chunk at a time: all at once needs ~6x the data's memory
            pairs.append(lab_pair(np.stack(photos)))
            photos = []
        bar.update(1)
        try:
            img = to_rgb(open_image(path))
        except (ImageError, ValueError, OSError):  # undecodable, or a mode PIL cannot make RGB
            unreadable += 1
            continue
        rgb = rgb_array(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC))
        if is_grayscale(rgb):
            gray += 1
            continue
        photos.append(rgb)
        kept.append(path)
    if unreadable or gray:
        warnings.warn(f"skipped {unreadable} unreadable and {gray} gray (colorless) images "
                      f"of {len(paths)} under {root}", stacklevel=2)
    if photos:
        pairs.append(lab_pair(np.stack(photos)))
    if not pairs:
        raise DataError(f"{root}: none of the {len(paths)} image files is a readable color photo")
    lightness, ab = pairs[0] if len(pairs) == 1 else (np.concatenate([pair[i] for pair in pairs]) for i in (0, 1))
    return (lightness, ab, kept) if with_paths else (lightness, ab)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of n items: (train_idx, val_idx), val at least 1 if asked."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = max(1, n_val)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def repeat_indices(indices: np.ndarray, paths: list, repeat: dict) -> np.ndarray:
    """Training indices into `paths` with every photo under a folder of `repeat` ({folder: k})
    listed k times, so an epoch sees it k times; the validation split is left as it was.
    DataError when a folder holds none of the training photos (a typo would repeat nothing)."""
    counts = np.ones(len(indices), dtype=np.int64)
    for folder, k in repeat.items():
        under = np.array([Path(folder) in Path(paths[i]).parents for i in indices], dtype=bool)
        if not under.any():
            raise DataError(f"--repeat {folder}: none of the training photos lies in that folder")
        counts[under] = k
    return np.repeat(indices, counts)


def epoch_plan(n: int, batch_size: int, seed: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The shuffled mini-batches of one epoch as (indices, flip_mask) pairs; the last partial batch is dropped.

    The plan depends only on (seed, epoch), so a resumed run sees exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    flips = rng.random(n) < 0.5
    n_batches = n // batch_size
    return [(order[i * batch_size:(i + 1) * batch_size], flips[i * batch_size:(i + 1) * batch_size])
            for i in range(n_batches)]


def crop_offsets(n: int, margin: int, seed: int, epoch: int) -> np.ndarray:
    """(n, 2) random top-left corners (y, x) in [0, margin] of each epoch position's crop window.

    Drawn from their own stream of (seed, epoch), so batches and flips stay as without cropping.
    """
    return np.random.default_rng([seed, epoch, 1]).integers(0, margin + 1, size=(n, 2))


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """(N, S + M, S + M, C) -> the central (N, S, S, C) view."""
    top = (images.shape[1] - size) // 2
    return images[:, top:top + size, top:top + size]


def make_batch(lightness: np.ndarray, ab: np.ndarray, indices: np.ndarray, flips: np.ndarray,
               offsets: np.ndarray | None = None, size: int | None = None):
    """Gather a batch and mirror the flagged images left-right (a free augmentation).

    With `offsets` (B, 2), image b is the size x size window whose top-left corner is offsets[b].
    """
    if offsets is None:
        L, target = lightness[indices], ab[indices]
    else:  # every window of every photo as a strided view; fancy indexing copies out the chosen ones
        windows = lambda a: np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(1, 2))
        pick = lambda a: windows(a)[indices, offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1)
        L, target = np.ascontiguousarray(pick(lightness)), np.ascontiguousarray(pick(ab))
    L[flips] = L[flips, :, ::-1]
    target[flips] = target[flips, :, ::-1]
    return L, target
