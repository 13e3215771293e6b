"""Several models on the same photos, side by side: gray | original | one column per model.

    python bench/side_by_side.py --model nanocolor/weights/colornet.npz --model runs/gan/model.npz \\
        --data ../shared/data/mixed128/test ../shared/data/scenes150/test --every 137 --photos 4 --out gallery.png

takes every K-th color photo of each folder (sorted by path, as nanocolor.evaluate scores them),
`--photos` of them per folder, and writes one PNG with a row per photo.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from nanocolor.evaluate import evaluate_folder, gallery_picture  # noqa: E402
from nanocolor.infer import load_colorizer  # noqa: E402
from nanocolor.images import write_png  # noqa: E402


def rows_of(weights: list[str], data: str, every: int, photos: int) -> list[tuple]:
    """(gray, original, colorized by each model) for every `every`-th photo of `data`, `photos` of them."""
    columns = []
    for path in weights:
        model, work_size = load_colorizer(path)
        ev = evaluate_folder(model, data, work_size, limit=every * (photos - 1) + 1, gallery_photos=photos,
                             gallery_every=every)
        columns.append(ev.gallery_rows)
    return [(*columns[0][i][:2], *(column[i][2] for column in columns)) for i in range(len(columns[0]))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NPZ", help="weights or checkpoint (repeat)")
    p.add_argument("--data", nargs="+", required=True, help="folders of color photos")
    p.add_argument("--every", type=int, default=1, help="take every K-th photo (default 1)")
    p.add_argument("--photos", type=int, default=4, help="photos per folder (default 4)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    rows = [row for data in args.data for row in rows_of(args.model, data, args.every, args.photos)]
    write_png(args.out, gallery_picture(rows))
    print(f"{args.out}: {len(rows)} photos, gray | original | {' | '.join(args.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
