"""Score a colorization model on a folder of color photos, beside the gray baseline.

Every color photo is colorized at full size the way colorize.py does it (infer.colorize_array)
and compared with its original as 8-bit RGB: mean PSNR, AuC (Zhang et al. 2016, a*b* error in
LAB units), colorfulness (Hasler and Suesstrunk 2003) and its ratio to the originals'. The gray
baseline is the photo's own lightness with a* = b* = 0, scored the same way. Examples:
    python -m nanocolor.evaluate --data ../shared/data/scenes150/test --weights nanocolor/weights/colornet.npz
    python -m nanocolor.evaluate --data photos/ --weights run/model.npz --limit 200 --gallery gallery.png --json
    python -m nanocolor.evaluate --data val/ --weights run/model.npz --chroma-gain 1 1.2 1.4   # a row per gain
A data folder with subfolders (one per class, say) also gets a table per subfolder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import backend, engine, options
from .data import DataError, ImageError, find_images, is_grayscale, read_photo
from .images import gray_of, side_by_side, to_uint8, write_png
from .infer import (DEFAULT_WEIGHTS, check_work_size, full_lightness, join_color, load_colorizer, predict_working_ab,
                    working_lightness)
from .progress import progress_bar
from .metrics import colorfulness, colorization_scores, summarize
from .pipes import ends_quietly_on_closed_stdout
from .model import ColorNet

GALLERY_PHOTOS = 8


@dataclass
class Evaluation:
    """Mean scores over `photos` color photos; `model` and `gray` hold psnr, auc, colorfulness,
    colorfulness_ratio. gallery_rows: (gray, original, colorized) RGB in [0, 1] of the first photos."""
    photos: int
    skipped_gray: int
    unreadable: int
    work_size: int
    original_colorfulness: float
    model: dict
    gray: dict
    chroma_gain: float = 1.0                            # the model's gain in `model`
    other_gains: dict = field(default_factory=dict)      # gain -> model scores with that gain instead
    per_folder: dict = field(default_factory=dict)       # first subfolder -> {"photos", "model", "gray", ...}
    gallery_rows: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "gallery_rows"}


def evaluate_folder(model: ColorNet, data: str | os.PathLike, work_size: int, limit: int | None = None,
                    gallery_photos: int = GALLERY_PHOTOS, gallery_every: int = 1,
                    progress: bool = False, other_gains: tuple = ()) -> Evaluation:
    """Colorize and score every color photo under `data` (the first `limit` of them, sorted by path).

    Unreadable files and photos that are already gray (data.is_grayscale) are skipped and counted.
    The gallery takes every `gallery_every`-th scored photo (spread over a sorted folder's classes).
    With `other_gains`, every photo is also colorized and scored with each of those chroma gains.
    """
    paths = find_images(data)
    model_scores, gray_scores, original_colorfulness, rows, folders = [], [], [], [], []
    gain_scores: dict = {g: [] for g in other_gains}
    unreadable = skipped_gray = 0
    bar = progress_bar(min(limit, len(paths)) if limit else len(paths), "evaluating", "photos", progress)
    for path in paths:
        if limit and len(model_scores) >= limit:
            break
        try:
            rgb, _ = read_photo(path)
        except ImageError:
            unreadable += 1
            continue
        if is_grayscale(rgb):
            skipped_gray += 1
            continue
        original = to_uint8(rgb)
        # as colorize_array, at the model's gain and every other one from one pass of the network
        L = full_lightness(rgb, np.float64)
        abs_ = predict_working_ab(model, working_lightness(model, L, work_size), (model.chroma_gain, *gain_scores))
        colorized, gray = join_color(L, abs_[0]), gray_of(rgb)
        for scores, ab in zip(gain_scores.values(), abs_[1:]):
            scores.append(colorization_scores(to_uint8(join_color(L, ab)), original))
        folders.append(_first_folder(path, data))
        model_scores.append(colorization_scores(to_uint8(colorized), original))
        gray_scores.append(colorization_scores(to_uint8(gray), original))
        original_colorfulness.append(colorfulness(original))
        if len(rows) < gallery_photos and (len(model_scores) - 1) % gallery_every == 0:
            rows.append((gray, rgb, colorized))
        bar.update(1)
    bar.close()
    if not model_scores:
        raise DataError(f"{data}: no readable color photo among {len(paths)} image files "
                        f"({skipped_gray} gray, {unreadable} unreadable)")
    per_folder = {}
    if len(set(folders)) > 1:
        for name in sorted(set(folders)):
            pick = [i for i, f in enumerate(folders) if f == name]
            reference = [original_colorfulness[i] for i in pick]
            per_folder[name] = {"photos": len(pick), "original_colorfulness": float(np.mean(reference)),
                                "model": summarize([model_scores[i] for i in pick], reference),
                                "gray": summarize([gray_scores[i] for i in pick], reference)}
    return Evaluation(photos=len(model_scores), skipped_gray=skipped_gray, unreadable=unreadable,
                      work_size=work_size, original_colorfulness=float(np.mean(original_colorfulness)),
                      model=summarize(model_scores, original_colorfulness),
                      gray=summarize(gray_scores, original_colorfulness), chroma_gain=model.chroma_gain,
                      other_gains={g: summarize(sc, original_colorfulness) for g, sc in gain_scores.items()},
                      per_folder=per_folder, gallery_rows=rows)


def _first_folder(path: Path, root: str | os.PathLike) -> str:
    """The subfolder of `root` a photo lies in ('.' for one directly in it)."""
    parts = Path(path).relative_to(Path(root)).parts
    return parts[0] if len(parts) > 1 else "."


def format_table(ev: Evaluation) -> str:
    """The scores as a plain-text table: gray baseline, model (and its other gains), originals;
    then one table per subfolder when the photos lie in several."""
    lines = [f"{ev.photos} color photos ({ev.skipped_gray} gray and {ev.unreadable} unreadable skipped), "
             f"work size {ev.work_size}"]
    model_rows = [(_gain_name(ev.chroma_gain), ev.model)] + [(_gain_name(g), s) for g, s in ev.other_gains.items()]
    lines += _rows(ev.gray, model_rows, ev.original_colorfulness)
    for folder, part in ev.per_folder.items():
        lines += ["", f"{folder}: {part['photos']} photos"]
        lines += _rows(part["gray"], [("model", part["model"])], part["original_colorfulness"])
    return "\n".join(lines)


def _gain_name(gain: float) -> str:
    return "model" if gain == 1.0 else f"model, chroma gain {gain:g}"


def _rows(gray: dict, models: list, original_colorfulness: float) -> list[str]:
    lines = [f"{'':28}{'PSNR dB':>9}{'AuC':>8}{'colorful':>10}{'ratio':>7}"]
    for name, s in [("gray baseline (ab=0)", gray)] + models:
        lines.append(f"{name:28}{s['psnr']:9.2f}{s['auc']:8.4f}{s['colorfulness']:10.2f}"
                     f"{s['colorfulness_ratio']:7.3f}")
    lines.append(f"{'originals':28}{'-':>9}{'-':>8}{original_colorfulness:10.2f}{1:7.3f}")
    return lines


def gallery_picture(rows: list) -> Image.Image:
    """(gray, original, colorized) rows -> one picture; photos of other sizes are resized to the first's."""
    h, w = rows[0][0].shape[:2]
    fitted = [tuple(img if img.shape[:2] == (h, w) else
                    np.asarray(Image.fromarray(to_uint8(img)).resize((w, h), Image.Resampling.BICUBIC)) / 255.0
                    for img in row) for row in rows]
    return side_by_side(fitted)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of color photos, searched recursively")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="model weights or checkpoint, or a shipped model's name (default: the shipped model)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N color photos (sorted by path)")
    p.add_argument("--gallery", metavar="PNG", help=f"write gray | original | colorized of {GALLERY_PHOTOS} photos")
    p.add_argument("--gallery-every", type=int, default=1, metavar="K",
                   help="gallery photos are every K-th scored photo (default 1: the first ones)")
    p.add_argument("--work-size", type=int, default=None,
                   help="longer side at which the network predicts color (default: the one stored with the "
                        "weights, else the model's training size x 2)")
    p.add_argument("--chroma-gain", type=float, nargs="+", metavar="G",
                   help="multiply the predicted a*b* by G instead of the weights' own gain (times each photo's "
                        "kind's gain where the weights have a kind head); several values: "
                        "one row each (the first is the model's row, of the gallery and per-folder tables)")
    p.add_argument("--json", action="store_true", help="also print the scores as one JSON line")
    engine.add_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@ends_quietly_on_closed_stdout
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options.check_number("--limit", args.limit, low=1)
        options.check_number("--gallery-every", args.gallery_every, low=1)
        check_work_size(args.work_size)
        backend.use_device(args.device)
        engine.set_conv(args.conv)
        for gain in args.chroma_gain or ():
            options.check_number("--chroma-gain", gain, low=0, high=10, above=True)
        model, work_size = load_colorizer(args.weights)
        gains = args.chroma_gain or [model.chroma_gain]
        model.chroma_gain = gains[0]
        ev = evaluate_folder(model, args.data, args.work_size or work_size, limit=args.limit,
                             gallery_photos=GALLERY_PHOTOS if args.gallery else 0,
                             gallery_every=args.gallery_every, progress=not args.quiet,
                             other_gains=tuple(gains[1:]))
    except (ValueError, backend.DeviceError, OSError) as err:  # DataError, CorruptFileError are ValueErrors
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(ev), flush=True)  # the scores first: a bad --gallery path must not lose them
    if args.json:
        print(json.dumps(ev.as_dict()), flush=True)
    if args.gallery:
        try:
            options.check_output_folder(Path(args.gallery).parent)
            write_png(args.gallery, gallery_picture(ev.gallery_rows))
        except OSError as err:
            where = f"{err.filename}: {err.strerror}" if isinstance(err, NotADirectoryError) else err.strerror
            print(f"evaluate: error: cannot write the gallery {args.gallery} ({where or err})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
