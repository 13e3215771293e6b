"""Choose the chroma gain of each kind of a kind head on validation photos, never on the test sets.

    python bench/val_gains.py --data $D/mixed128/train $D/scenes150/train --size 96 \\
        --model nanocolor/weights/colornet.npz --link runs/val     # the held-out photos, linked
    python bench/kind_gains.py --model kinds.npz --val runs/val/mixed128 runs/val/scenes150 \\
        --min-ratio 0.83 0.87

scores every photo under each --val folder whole, at its work size, as nanocolor.evaluate does,
at a grid of gains (one pass of the network per photo), and reads the kind head's probabilities
(one more pass of the encoder, in the textbook layers).
A photo's gain is its kinds' gains weighed by those. The gains are then chosen, one kind at a
time, sweep after sweep, on the grid: the most PSNR above gray, summed over the folders, such
that each folder's colorfulness ratio is at least its --min-ratio, no subfolder (a kind of
photo: faces, forest, ...) is painted more colorful than its originals (--max-ratio) and, with
--floor, none scores less than that above gray. Prints the chosen gains, the kindhead.py
arguments that set them (chroma gain 1), and each folder's and subfolder's scores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from nanocolor import backend  # noqa: E402
from nanocolor.color import scale_lightness  # noqa: E402
from nanocolor.data import find_images, is_grayscale, read_photo  # noqa: E402
from nanocolor.images import gray_of, to_uint8  # noqa: E402
from nanocolor.infer import (full_lightness, join_color, load_colorizer, predict_working_ab,  # noqa: E402
                             working_lightness)
from nanocolor.kindhead import kind_of  # noqa: E402
from nanocolor.metrics import colorfulness, colorization_scores  # noqa: E402
from nanocolor.progress import progress_bar  # noqa: E402

GRID = np.round(np.arange(0.5, 1.6001, 0.05), 2)


def score_photos(model, work_size: int, folders: list) -> dict:
    """Per photo: its folder and subfolder, the kind probabilities, the originals' colorfulness,
    gray's PSNR, and PSNR, AuC and colorfulness at every gain of GRID (the network's own colors
    times the gain, the kind head's factor left out)."""
    kind_head, chroma_gain = model.kind_head, model.chroma_gain
    rows = {k: [] for k in ("folder", "sub", "probs", "orig", "gray", "psnr", "auc", "colorfulness")}
    paths = [(f, p) for f in folders for p in find_images(f)]
    bar = progress_bar(len(paths), "scoring", "photos", True)
    try:
        model.kind_head, model.chroma_gain = None, 1.0  # predict at factor 1: the grid is the gain
        for folder, path in paths:
            bar.update(1)
            rgb, _ = read_photo(path)
            if is_grayscale(rgb):
                continue
            original, L = to_uint8(rgb), full_lightness(rgb, np.float64)
            small = working_lightness(model, L, work_size)
            scores = [colorization_scores(to_uint8(join_color(L, ab)), original)
                      for ab in predict_working_ab(model, small, tuple(GRID))]
            model.encode(backend.xp.asarray(scale_lightness(small)[None, ..., None], dtype=np.float32))
            rows["folder"].append(Path(folder).name)
            rows["sub"].append(kind_of(path, [folder]))
            rows["probs"].append(backend.to_numpy(kind_head.probabilities(model.encoded))[0])
            rows["orig"].append(colorfulness(original))
            rows["gray"].append(colorization_scores(to_uint8(gray_of(rgb)), original)["psnr"])
            for name in ("psnr", "auc", "colorfulness"):
                rows[name].append([s[name] for s in scores])
    finally:
        bar.close()
        model.kind_head, model.chroma_gain = kind_head, chroma_gain
    return {k: np.array(v) for k, v in rows.items()}


def at_gains(table: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Per-photo scores (N, len(GRID)) -> each photo's score at its own gain (N,), linearly between
    the grid's points."""
    position = (np.clip(gains, GRID[0], GRID[-1]) - GRID[0]) / (GRID[1] - GRID[0])
    i = np.minimum(position.astype(int), len(GRID) - 2)
    t, n = position - i, np.arange(len(table))
    return table[n, i] * (1 - t) + table[n, i + 1] * t


def summary(s: dict, gains: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(PSNR above gray, colorfulness ratio, AuC) of the photos in mask, each at its own gain."""
    return (float(at_gains(s["psnr"], gains)[mask].mean() - s["gray"][mask].mean()),
            float(at_gains(s["colorfulness"], gains)[mask].mean() / s["orig"][mask].mean()),
            float(at_gains(s["auc"], gains)[mask].mean()))


def choose(s: dict, kinds: int, min_ratio: dict, max_ratio: float, floor: float | None = None,
           sweeps: int = 4) -> np.ndarray:
    """The kinds' gains (kinds,) on GRID: the most PSNR above gray summed over the folders, with
    each folder's ratio >= its min_ratio, each subfolder's <= max_ratio and its PSNR above gray
    >= floor (as penalties)."""
    folders, subs = sorted(set(s["folder"])), sorted(set(s["sub"]))

    def value(g: np.ndarray) -> float:
        photo_gains = s["probs"] @ g
        total = 0.0
        for f in folders:
            db, ratio, _ = summary(s, photo_gains, s["folder"] == f)
            total += db - 50 * max(0.0, min_ratio[f] - ratio)
        for sub in subs:
            db, ratio, _ = summary(s, photo_gains, s["sub"] == sub)
            total -= 50 * max(0.0, ratio - max_ratio) + (50 * max(0.0, floor - db) if floor is not None else 0)
        return total

    g = np.ones(kinds)
    for _ in range(sweeps):
        for k in range(kinds):
            g[k] = max(GRID, key=lambda v: value(np.where(np.arange(kinds) == k, v, g)))
    return g


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="weights with a kind head (nanocolor.kindhead)")
    p.add_argument("--val", nargs="+", required=True, help="folders of validation photos, one subfolder per kind")
    p.add_argument("--min-ratio", type=float, nargs="+", required=True,
                   help="the least colorfulness ratio of each --val folder, in their order")
    p.add_argument("--max-ratio", type=float, default=1.0,
                   help="the most colorfulness ratio of any subfolder (default 1: no kind more colorful than life)")
    p.add_argument("--floor", type=float, default=None,
                   help="the least PSNR above gray, in dB, of any subfolder (default: none)")
    args = p.parse_args(argv)
    if len(args.min_ratio) != len(args.val):
        p.error("give one --min-ratio for each --val folder")
    model, work_size = load_colorizer(args.model)
    if model.kind_head is None:
        p.error(f"{args.model} has no kind head (fit one with python -m nanocolor.kindhead)")
    s = score_photos(model, work_size, args.val)
    kinds = model.kind_head.kinds
    g = choose(s, len(kinds), {Path(f).name: r for f, r in zip(args.val, args.min_ratio)}, args.max_ratio,
               args.floor)
    print("gains: " + ", ".join(f"{k} {v:g}" for k, v in zip(kinds, g)))
    print("kindhead.py --chroma-gain 1 " + " ".join(f"--gain {k}={v:g}" for k, v in zip(kinds, g)))
    for name, photo_gains in (("one gain, the file's", np.full(len(s["psnr"]), model.chroma_gain)),
                              ("the chosen gains", s["probs"] @ g)):
        print(f"{name}: PSNR above gray / colorfulness ratio / AuC")
        for key in ("folder", "sub"):
            for f in sorted(set(s[key])):
                db, ratio, auc = summary(s, photo_gains, s[key] == f)
                print(f"  {f:12s} {db:+.2f} dB  {ratio:.3f}  {auc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
