"""Colorize wall time and peak memory on big photos: `colorize.py` run as a user runs it.

    python bench/colorize_bench.py                   # 1024x768, 5 MP and 20 MP, 3 runs each, a table
    python bench/colorize_bench.py --sizes 1024x768 --runs 5
    python bench/colorize_bench.py --json
    python bench/colorize_bench.py --device gpu      # colorize.py --device gpu (CuPy)
    python bench/colorize_bench.py --sizes --videos 640x360 --frames 240   # videos only (needs nanocolor[video])

For each size a synthetic photo (smooth color gradients, shapes and noise, JPEG quality 90, so
decoding and PNG compression cost what they cost on a photo) is written once to a temporary
folder; then `python colorize.py PHOTO --output DIR` runs --runs times, each a fresh process:
wall time from start to exit (Python start-up, imports, weight loading, decoding, colorizing,
PNG writing) and the process's peak resident memory (ru_maxrss from wait4). Reported: the
median and range of the wall times, the peak RSS, and the memory growth per pixel between the
smallest and the largest photo. Also timed alone, in fresh processes: Python's own start-up,
`import nanocolor.infer` and loading the shipped weights.

Videos (--videos, default 640x360, 1280x720 and 1920x1080): a synthetic H.264 clip of --frames
frames (a slow pan and zoom across a synthetic photo) is colorized by video.colorize_video in a
fresh process, --runs times: frames per second from the first frame decoded to the output renamed
into place (decoding, the network, the full-resolution join, smoothing and encoding; start-up and
loading the weights excluded), and the process's peak RSS.

Pause other work on the machine first; thread counts are left as the environment sets them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = ("1024x768", "2592x1944", "5472x3648")  # 0.8, 5.0 and 20.0 megapixels
VIDEO_SIZES = ("640x360", "1280x720", "1920x1080")
# Run in a fresh process: colorize argv[1] into argv[2] with weights argv[3], print "frames seconds" of
# colorize_video alone.
VIDEO_RUN = ("import sys, time; from nanocolor.infer import load_colorizer; from nanocolor.video import colorize_video; "
             "model, work = load_colorizer(sys.argv[3]); t0 = time.perf_counter(); "
             "n = colorize_video(model, sys.argv[1], sys.argv[2], work, progress=False); "
             "print(n, time.perf_counter() - t0)")


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT") from None
    return width, height


def synthetic_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A JPEG with a photo's statistics where it matters: smooth gradients, edges, some noise."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for c, (fx, fy, phase) in enumerate([(3.0, 1.0, 0.0), (1.0, 2.5, 1.0), (2.0, 2.0, 2.0)]):
        channel = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        rgb[..., c] = np.clip(channel * 255 + rng.normal(0, 6, (height, width)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(width // 40 + 1, width // 6 + 2))
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img.save(path, quality=90)


def run_measured(command: list[str], env: dict | None = None, output: list | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises when it fails. Its stdout is
    appended to `output` when given."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE if output is not None else
                            subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if output is not None:
        output.append(proc.stdout.read().decode())
        proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr}")
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return wall, peak


def synthetic_clip(path: Path, width: int, height: int, frames: int) -> None:
    """An H.264 clip at 24 frames/s: a slow pan and zoom across a synthetic photo twice the frame's size."""
    import numpy as np
    from PIL import Image
    from fractions import Fraction
    from nanocolor.video import VideoWriter, pan_windows, render_shot
    synthetic_photo(path.with_suffix(".jpg"), 2 * width, 2 * height)
    photo = np.asarray(Image.open(path.with_suffix(".jpg")))
    windows = pan_windows(photo.shape, frames, width / height, zoom=1.2)
    with VideoWriter(path, width, height, Fraction(24), Fraction(1, 24)) as writer:
        for start in range(0, frames, 24):  # rendered 24 at a time: memory stays small
            for k, frame in enumerate(render_shot(photo, windows[start:start + 24], (width, height))):
                writer.write(frame, start + k)
        writer.finish()


def video_rows(sizes: list[tuple[int, int]], frames: int, runs: int, folder: Path, weights: str) -> list[dict]:
    """For each size: frames/s of colorize_video (median and range over `runs` fresh processes), peak RSS."""
    rows = []
    for width, height in sizes:
        clip = folder / f"clip_{width}x{height}.mp4"
        synthetic_clip(clip, width, height, frames)
        rates, peaks = [], []
        for run in range(runs):
            printed = []
            _, peak = run_measured([sys.executable, "-c", VIDEO_RUN, str(clip), str(folder / f"out_{run}.mp4"), weights],
                                   output=printed)
            count, seconds = printed[0].split()
            rates.append(int(count) / float(seconds))
            peaks.append(peak)
        rows.append({"video": f"{width}x{height}", "frames": frames, "fps": statistics.median(rates),
                     "fps_min": min(rates), "fps_max": max(rates), "peak_rss_mb": max(peaks), "runs": runs})
    return rows


def startup_costs(runs: int) -> dict:
    """Median seconds, each in fresh processes: Python alone, `import nanocolor.infer`, and that
    import plus loading the shipped weights (the import and load measured inside the process)."""
    python = [run_measured([sys.executable, "-c", "pass"])[0] for _ in range(runs)]
    code = ("import time; t0 = time.perf_counter(); import nanocolor.infer as infer; t1 = time.perf_counter(); "
            "infer.load_colorizer('nanocolor/weights/colornet.npz'); t2 = time.perf_counter(); "
            "print(t1 - t0, t2 - t1)")
    imports, loads = [], []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        a, b = (float(v) for v in done.stdout.split())
        imports.append(a)
        loads.append(b)
    return {"python_startup_s": statistics.median(python), "import_s": statistics.median(imports),
            "load_weights_s": statistics.median(loads)}


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(DEFAULT_SIZES), type=str,
                        help="photo sizes WIDTHxHEIGHT (default: 1024x768 2592x1944 5472x3648; none: no photos)")
    parser.add_argument("--videos", nargs="*", default=list(VIDEO_SIZES), type=str,
                        help="video frame sizes (default: 640x360 1280x720 1920x1080; none: no videos)")
    parser.add_argument("--frames", type=int, default=96, help="frames per video clip (default 96)")
    parser.add_argument("--runs", type=int, default=3, help="colorize.py runs per size (default 3)")
    parser.add_argument("--weights", default="nanocolor/weights/colornet.npz",
                        help="the model to colorize with (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="passed to colorize.py (gpu: the network on CuPy; default cpu)")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    videos = [parse_size(s) for s in args.videos]
    if args.runs < 1 or args.frames < 1:
        parser.error("--runs and --frames must be at least 1")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in sizes:
            photo = Path(tmp) / f"photo_{width}x{height}.jpg"
            synthetic_photo(photo, width, height)
            walls, peaks = [], []
            for run in range(args.runs):
                out = Path(tmp) / f"out_{width}x{height}_{run}"
                wall, peak = run_measured([sys.executable, "colorize.py", str(photo), "--output", str(out),
                                           "--device", args.device, "--weights", args.weights])
                walls.append(wall)
                peaks.append(peak)
            rows.append({"size": f"{width}x{height}", "megapixels": width * height / 1e6,
                         "wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
                         "peak_rss_mb": max(peaks), "runs": args.runs})
        clips = video_rows(videos, args.frames, args.runs, Path(tmp), args.weights) if videos else []
    start = startup_costs(args.runs)
    if len(rows) > 1:
        small, big = min(rows, key=lambda r: r["megapixels"]), max(rows, key=lambda r: r["megapixels"])
        growth = (big["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / ((big["megapixels"] - small["megapixels"]) * 1e6)
    else:
        growth = None
    if args.json:
        for row in rows:
            print(json.dumps({**row, **start, "rss_bytes_per_pixel_growth": growth}))
        for row in clips:
            print(json.dumps(row))
        return 0
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"colorize.py --device {args.device}, --weights {args.weights}, default work size; {cpu}, {os.cpu_count()} logical CPUs; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    if rows:
        print(f"{'photo':>12s}{'MP':>7s}{'wall s (median)':>17s}{'range':>16s}{'peak RSS MiB':>14s}")
    for row in rows:
        print(f"{row['size']:>12s}{row['megapixels']:7.1f}{row['wall_s']:17.2f}"
              f"{row['wall_min_s']:8.2f} - {row['wall_max_s']:5.2f}{row['peak_rss_mb']:14.0f}")
    if growth is not None:
        print(f"peak RSS growth: {growth:.0f} bytes per pixel (smallest to largest photo)")
    if clips:
        print(f"{'video':>12s}{'frames':>8s}{'frames/s (median)':>19s}{'range':>16s}{'peak RSS MiB':>14s}")
    for row in clips:
        print(f"{row['video']:>12s}{row['frames']:8d}{row['fps']:19.1f}"
              f"{row['fps_min']:8.1f} - {row['fps_max']:5.1f}{row['peak_rss_mb']:14.0f}")
    print(f"start-up, medians of {args.runs}: Python {start['python_startup_s']:.3f} s, "
          f"import nanocolor.infer {start['import_s']:.3f} s, loading the weights {start['load_weights_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
