"""Choose a chroma gain on a training run's validation photos, never on the test sets.

    python bench/val_gains.py --data ../shared/data/mixed128/train ../shared/data/scenes150/train \\
        --model runs/long/model.npz --model runs/big/model.npz --gains 0.9 1 1.1 1.2 1.3

loads the photos as train.py does (--size, --val-fraction and --seed as the run had them; the
defaults are train.py's) and scores each model on the held-out split, the central size x size
crops the trainer validates on: mean PSNR (8-bit RGB) and colorfulness ratio, one row per gain,
after the gray baseline's PSNR (a*b* = 0). With --link DIR it also links the held-out photos
themselves into DIR/<data folder's parent>/<path under it>, so that nanocolor.evaluate can score
them whole, as it scores the test sets (say, to choose a work size):

    python bench/val_gains.py --data ../shared/data/mixed128/train ../shared/data/scenes150/train \
        --size 96 --model nanocolor/weights/colornet.npz --link runs/val
    python -m nanocolor.evaluate --data runs/val/mixed128 --work-size 128 --chroma-gain 1 1.2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from nanocolor import engine  # noqa: E402
from nanocolor.data import center_crop, load_dataset, split_indices  # noqa: E402
from nanocolor.infer import load_colorizer  # noqa: E402
from nanocolor.metrics import colorfulness, psnr  # noqa: E402
from nanocolor.trainer import TrainConfig, lab_to_rgb_batch  # noqa: E402


def scores(model, lightness, truth, gains: tuple, batch: int = 64) -> dict:
    """{gain: (mean PSNR, colorfulness ratio)} of `model` on scaled lightness (N, S, S, 1) against
    the true photos, 8-bit RGB (N, S, S, 3)."""
    net = engine.network(model.eval())
    ab_pred = np.concatenate([net.forward(lightness[i:i + batch]) for i in range(0, len(lightness), batch)])
    reference = np.mean([colorfulness(t) for t in truth])
    rows = {}
    for gain in gains:
        rgb = np.round(lab_to_rgb_batch(lightness, ab_pred * gain) * 255)
        rows[gain] = (float(np.mean([psnr(p, t) for p, t in zip(rgb, truth)])),
                      float(np.mean([colorfulness(p) for p in rgb]) / reference))
    return rows


def link_photos(paths: list, roots: list, out: Path) -> None:
    """Each photo as out/<its data folder's parent name>/<its path under that folder>."""
    roots = [Path(r).resolve() for r in roots]
    for path in (Path(p).resolve() for p in paths):
        root = next(r for r in roots if r in path.parents)
        dest = out / root.parent.name / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    print(f"{len(paths)} validation photos linked under {out}")


def main(argv=None) -> int:
    defaults = TrainConfig(data=[], out="")  # train.py's defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="the run's --data folders")
    p.add_argument("--model", action="append", required=True, metavar="NPZ", help="weights or checkpoint (repeat)")
    p.add_argument("--gains", type=float, nargs="+", default=[0.9, 1.0, 1.1, 1.2, 1.3])
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--link", metavar="DIR", help="also link the validation photos into DIR (copies where "
                                                 "links are not allowed)")
    args = p.parse_args(argv)
    lightness, ab, paths = load_dataset(args.data, args.size + args.size // 4, progress=True, with_paths=True)
    _, val = split_indices(len(lightness), args.val_fraction, args.seed)
    if args.link:
        link_photos([paths[i] for i in val], args.data, Path(args.link))
    lightness, ab = center_crop(lightness[val], args.size), center_crop(ab[val], args.size)
    print(f"{len(val)} validation photos, {args.size}x{args.size} center crops")
    gray = np.round(lab_to_rgb_batch(lightness, np.zeros_like(ab)) * 255)
    truth = np.round(lab_to_rgb_batch(lightness, ab) * 255)
    print(f"gray baseline: PSNR {np.mean([psnr(g, t) for g, t in zip(gray, truth)]):.2f} dB")
    for path in args.model:
        model, _ = load_colorizer(path)
        for gain, (db, ratio) in scores(model, lightness, truth, tuple(args.gains)).items():
            print(f"{path}  gain {gain:g}: PSNR {db:.2f} dB, colorfulness ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
