#!/usr/bin/env python3
"""Colorize grayscale (or color) photos with a trained nanocolor model.

Writes <name>_color.png beside each input, or DIR/<name>.png with --output DIR; the output has the
input's exact size and lightness, and keeps its alpha channel. Examples:
    python colorize.py old_photo.jpg
    python colorize.py scans/ --output colorized/ --compare
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanocolor import backend
from nanocolor.data import IMAGE_EXTENSIONS, ImageError
from nanocolor.infer import colorize_file, load_colorizer
from nanocolor.serialize import CorruptFileError

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


def output_paths(path: Path, output_dir: str | None, compare: bool) -> tuple[Path, Path | None]:
    """Where the colorized image (and the comparison picture) of `path` go."""
    out_path = Path(output_dir) / f"{path.stem}.png" if output_dir else path.with_name(f"{path.stem}_color.png")
    compare_path = out_path.with_name(out_path.stem.removesuffix("_color") + "_compare.png") if compare else None
    return out_path, compare_path


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.work_size is not None and args.work_size < 1:
        print("colorize.py: error: --work-size must be at least 1", file=sys.stderr)
        return 2
    try:
        backend.use_device(args.device)
        model, work_size = load_colorizer(args.weights)
    except (backend.DeviceError, CorruptFileError) as err:
        print(f"colorize.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    work_size = args.work_size or work_size
    paths = expand_inputs(args.inputs)
    if not paths:
        print("colorize.py: error: no image files found in the given folders", file=sys.stderr)
        return 1
    failures, claimed = 0, {}
    for done, path in enumerate(paths):
        out_path, compare_path = output_paths(path, args.output, args.compare)
        try:
            first = claimed.get(out_path.resolve(), path)
            if first != path:  # e.g. photo.jpg and photo.png into one --output folder
                raise FileExistsError(f"{path}: its output {out_path} would overwrite that of {first}")
            colorize_file(model, path, out_path, work_size, compare_path)
            claimed[out_path.resolve()] = path
            print(f"{path} -> {out_path}")
        except KeyboardInterrupt:
            print(f"colorize.py: interrupted after {done} of {len(paths)} images", file=sys.stderr)
            return 130
        except Exception as err:  # one bad file must not stop the batch
            failures += 1
            if isinstance(err, ImageError) or (isinstance(err, OSError) and not err.strerror):
                reason = str(err)
            elif isinstance(err, OSError):
                reason = f"{path}: cannot write {out_path} ({err.strerror})"
            elif isinstance(err, MemoryError):
                reason = f"{path}: not enough memory to colorize it"
            else:
                reason = f"{path}: failed ({err.__class__.__name__}: {err})"
            print(f"colorize.py: error: {one_line(reason)}", file=sys.stderr)
    if failures:
        print(f"colorize.py: {failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
