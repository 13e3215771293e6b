"""Steady colors, measured and shown: per-frame colorization against nanocolor's smoothing.

    python docs/video_strip.py                                  # data/sample, writes docs/video_strip.png
    python docs/video_strip.py --data ../shared/data/scenes150/test --photos 12

Clips with known truth are filmed from still color photos (video.render_shot): for each photo a
shot that pans and zooms slowly (video.pan_windows), the shots joined by cuts. The clip is colorized
frame by frame alone and with video.ChromaSmoother (no codec: the colorizer's own frames); printed
are the flicker (video.flicker: mean |change of a*b*| at the same scene point between consecutive
frames) of the truth, per-frame and smoothed output, and the mean PSNR against the truth frames.
The picture: the first frames of the shot where per-frame colors flicker most, in rows: original,
per-frame, its change of a*b* from the frame before (darker: more change), smoothed, its change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanocolor import video  # noqa: E402
from nanocolor.color import rgb_to_lab  # noqa: E402
from nanocolor.data import find_images  # noqa: E402
from nanocolor.infer import load_colorizer  # noqa: E402
from nanocolor.metrics import psnr  # noqa: E402


def shots_of(photos: list[Path], size: tuple[int, int], frames: int) -> list[tuple[list[np.ndarray], list]]:
    """One shot per photo: (truth frames (H, W, 3) uint8, crop windows), panning and zooming by 15%."""
    shots = []
    for path in photos:
        photo = np.asarray(Image.open(path).convert("RGB"))
        windows = video.pan_windows(photo.shape, frames, size[0] / size[1], zoom=1.15, travel=0.5)
        shots.append((video.render_shot(photo, windows, size), windows))
    return shots


def ab_of(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [rgb_to_lab(f / 255.0)[..., 1:] for f in frames]


def scores(frames: list[np.ndarray], shots) -> tuple[list[float], float]:
    """(flicker of each shot, mean PSNR against the truth frames) of a clip in shot order."""
    flickers, start = [], 0
    for truth, windows in shots:
        flickers.append(video.flicker(ab_of(frames[start:start + len(truth)]), windows))
        start += len(truth)
    truth = [f for shot, _ in shots for f in shot]
    return flickers, float(np.mean([psnr(f, t) for f, t in zip(frames, truth)]))


def change_pictures(frames: list[np.ndarray], windows, gain: float = 25.0) -> list[np.ndarray]:
    """Each frame's |change of a*b*| from the frame before at the same scene point, as a gray picture
    (white: no change, black: `gain` LAB units or more); the first frame has none (white)."""
    ab = ab_of(frames)
    pictures = [np.full(frames[0].shape, 255, np.uint8)]
    for i in range(1, len(frames)):
        change, seen = video.flicker_map(ab[i - 1], ab[i], windows[i - 1], windows[i])
        level = np.clip(255 - 255 * change * seen / gain, 0, 255).astype(np.uint8)
        pictures.append(np.repeat(level[..., None], 3, axis=-1))
    return pictures


def strip(rows: list[tuple[str, list[np.ndarray]]], gap: int = 4, label: int = 90) -> Image.Image:
    """Rows of equally sized frames, each row named at its left, white between."""
    h, w = rows[0][1][0].shape[:2]
    cols = len(rows[0][1])
    canvas = Image.new("RGB", (label + cols * (w + gap), len(rows) * (h + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, frames) in enumerate(rows):
        draw.text((4, r * (h + gap) + h // 2 - 6), name, fill="black")
        for c, frame in enumerate(frames):
            canvas.paste(Image.fromarray(frame), (label + c * (w + gap), r * (h + gap)))
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "sample"), help="folder of color photos")
    parser.add_argument("--photos", type=int, default=6, help="shots (one photo each, spread over the folder)")
    parser.add_argument("--frames", type=int, default=16, help="frames per shot")
    parser.add_argument("--size", default="160x96", help="frame size WIDTHxHEIGHT")
    parser.add_argument("--out", default=str(ROOT / "docs" / "video_strip.png"))
    parser.add_argument("--show", type=int, default=6, help="frames of the first shot in the picture")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    found = find_images(args.data)
    photos = [found[i] for i in np.linspace(0, len(found) - 1, args.photos).astype(int)]
    shots = shots_of(photos, size, args.frames)
    truth = [f for shot, _ in shots for f in shot]
    model, work_size = load_colorizer(ROOT / "nanocolor" / "weights" / "colornet.npz")
    per_frame = list(video.colorize_frames(model, truth, work_size, smooth=False))
    smoothed = list(video.colorize_frames(model, truth, work_size))
    print(f"{len(shots)} shots of {args.frames} frames at {size[0]}x{size[1]} from {args.data}")
    results = {name: scores(frames, shots) for name, frames in
               (("truth", truth), ("per-frame", per_frame), ("smoothed", smoothed))}
    for name, (flickers, quality) in results.items():
        print(f"{name:>10s}: flicker {np.mean(flickers):.3f} (shots: {' '.join(f'{v:.2f}' for v in flickers)})"
              + (f", PSNR {quality:.2f} dB" if name != "truth" else ""))
    shown = int(np.argmax(results["per-frame"][0]))  # the shot where per-frame colors flicker most
    first = shown * args.frames
    show, windows = slice(first, first + args.show), shots[shown][1][:args.show]
    picture = strip([("original", truth[show]),
                     ("per-frame", per_frame[show]), ("change", change_pictures(per_frame[show], windows)),
                     ("smoothed", smoothed[show]), ("change", change_pictures(smoothed[show], windows))])
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out}: shot {shown + 1} ({photos[shown].relative_to(args.data)}), frames 1-{args.show}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
