#!/usr/bin/env python3
"""Colorize grayscale (or color) photos with a trained nanocolor model.

Writes <name>_color.png beside each input, or DIR/<name>.png with --output DIR; the output has the
input's exact size and lightness, and keeps its alpha channel. Examples:
    python colorize.py old_photo.jpg
    python colorize.py scans/ --output colorized/ --compare
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nanocolor import backend
from nanocolor.data import IMAGE_EXTENSIONS, ImageError, alpha_channel, open_image, rgb_array, to_rgb
from nanocolor.infer import colorize_array, gray_of, side_by_side, to_uint8
from nanocolor.model import ColorNet
from nanocolor.serialize import CorruptFileError, atomic_write_bytes, load_npz

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "nanocolor" / "weights" / "colornet.npz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--output", metavar="DIR", help="write DIR/<name>.png instead of <name>_color.png beside the input")
    p.add_argument("--compare", action="store_true",
                   help="also write <name>_compare.png: grayscale | original | colorized")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                   help="model weights (.npz from train.py: model.npz or checkpoint.npz); default: the shipped model")
    p.add_argument("--work-size", type=int, default=None,
                   help="longer side, in pixels, at which the network predicts color "
                        "(default: the model's training size x 2)")
    p.add_argument("--device", default=None, help="cpu or gpu (CuPy); default $NANOCOLOR_DEVICE or cpu")
    return p.parse_args(argv)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to the image files directly inside them, sorted."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)
    return paths


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    pixels = to_uint8(rgb)
    img = Image.fromarray(np.dstack([pixels, alpha]), "RGBA") if alpha is not None else Image.fromarray(pixels)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def colorize_file(model: ColorNet, path: Path, out_path: Path, work_size: int, compare: bool) -> None:
    img = open_image(path)
    rgb = rgb_array(to_rgb(img))
    colorized = colorize_array(model, rgb, work_size)
    data = encode_png(colorized, alpha_channel(img))  # encode fully before touching the disk
    atomic_write_bytes(out_path, data)
    if compare:
        picture = side_by_side([(gray_of(rgb), rgb, colorized)])
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        atomic_write_bytes(out_path.with_name(out_path.stem.removesuffix("_color") + "_compare.png"),
                           buffer.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        backend.use_device(args.device)
        model = ColorNet.load(args.weights)
        work_size = args.work_size or 2 * int(load_npz(args.weights)[1].get("train_size", 64))
    except (backend.DeviceError, CorruptFileError) as err:
        print(f"colorize.py: error: {err}", file=sys.stderr)
        return 2
    failures = 0
    paths = expand_inputs(args.inputs)
    if not paths:
        print("colorize.py: error: no image files found in the given folders", file=sys.stderr)
        return 1
    for path in paths:
        out_path = Path(args.output) / f"{path.stem}.png" if args.output else path.with_name(f"{path.stem}_color.png")
        try:
            colorize_file(model, path, out_path, work_size, args.compare)
            print(f"{path} -> {out_path}")
        except (ImageError, OSError) as err:
            failures += 1
            reason = str(err) if isinstance(err, ImageError) else f"{path}: cannot write {out_path} ({err.strerror or err})"
            print(f"colorize.py: error: {reason}", file=sys.stderr)
    if failures:
        print(f"colorize.py: {failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
