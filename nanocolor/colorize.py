"""Colorize grayscale (or color) photos with a trained nanocolor model.

Writes <name>_color.png beside each input, or OUT/<name>.png with --output OUT (folders are
searched recursively and their subfolders mirrored under OUT); the output has the input's exact
size and lightness, and keeps its alpha channel. A video (.mp4, .mkv, .mov, ...; needs
nanocolor[video]) gives <name>_color.mp4 (its own container) with steady colors and its audio.
No input and no file colorize.py did not write is ever replaced: a name that is taken gets a distinct one (<name>_<ext>.png, then a number).
Outputs of earlier runs found in a folder are recognised and skipped. `-` reads one image from
stdin and writes the PNG to stdout (or to the file --output names). Examples:
    python colorize.py old_photo.jpg               # or: nanocolor colorize old_photo.jpg
    python colorize.py scans/ --output colorized/ --compare
    python colorize.py film.mp4                    # film_color.mp4; --no-smooth: each frame alone
    cat scan.jpg | nanocolor colorize - > scan_color.png
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from nanocolor import backend, fast, options
from nanocolor.data import IMAGE_EXTENSIONS, ImageError, decode_image, photo_arrays
from nanocolor.infer import (MAX_WORK_SIZE, colorize_array, colorize_file, encode_png, frame_count,
                             is_colorize_output, load_colorizer)
from nanocolor.serialize import atomic_write_bytes
from nanocolor.video import VIDEO_EXTENSIONS, colorize_video, is_video, is_video_output

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "colornet.npz"
FOLDER_EXTENSIONS = IMAGE_EXTENSIONS | {".gif"} | VIDEO_EXTENSIONS  # what a folder search picks up


@dataclass
class Job:
    """One input and where its outputs go (compare is None without --compare)."""
    path: Path
    out: Path
    compare: Path | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+",
                   help="image files or folders of images (searched recursively); - reads one image from stdin")
    p.add_argument("--output", metavar="DIR",
                   help="write DIR/<subfolders>/<name>.png instead of <name>_color.png beside the input "
                        "(with -: the PNG file to write instead of stdout)")
    p.add_argument("--compare", action="store_true",
                   help="also write <name>_compare.png: grayscale | original | colorized "
                        "(for a video <name>_compare.mp4: grayscale | colorized)")
    p.add_argument("--no-smooth", action="store_true",
                   help="videos: colorize every frame alone (colors flicker; for comparison)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                   help="model weights (.npz from train.py: model.npz or checkpoint.npz); default: the shipped model")
    p.add_argument("--work-size", type=int, default=None,
                   help="longer side, in pixels, at which the network predicts color "
                        f"(default: the model's training size x 2; at most {MAX_WORK_SIZE})")
    p.add_argument("--device", default=None, help="cpu or gpu (CuPy); default $NANOCOLOR_DEVICE or cpu")
    p.add_argument("--conv", choices=fast.ENGINES, default="auto",
                   help="how layers are computed: im2col is the textbook code of nanocolor/layers.py; gemm and "
                        "winograd are the fast engine of nanocolor/fast; auto picks the fastest (default)")
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """ValueError or OSError, one line each, for settings that would fail every image."""
    options.check_number("--work-size", args.work_size, low=1)
    if args.work_size is not None and args.work_size > MAX_WORK_SIZE:
        raise ValueError(f"--work-size must be at most {MAX_WORK_SIZE}, got {args.work_size}: the network's "
                         f"memory grows with its square (about 1 GB at {MAX_WORK_SIZE})")
    if args.output is None:
        return
    output = Path(args.output)
    if args.inputs == ["-"]:  # one image from stdin: --output is the file to write
        options.check_output_folder(output.parent)
        return
    options.check_output_folder(output)
    if not output.is_dir() and output.suffix.lower() in FOLDER_EXTENSIONS:
        raise ValueError(f"--output {output} looks like a file name; --output takes a folder "
                         f"(each output is named after its input)")


def find_inputs(inputs: list[str], report) -> tuple[list[tuple[Path, Path]], int]:
    """(path, place) of every input image, and how many earlier outputs were skipped.

    Files are taken as given, place = their name; folders are searched recursively in sorted
    order, place = the path below the folder (mirrored under --output). PNGs colorize.py wrote
    are skipped in folders. An unreadable folder is reported through report(line) and passed over.
    """
    found, skipped = [], 0
    for name in inputs:
        top = Path(name)
        if not top.is_dir():
            found.append((top, Path(top.name)))
            continue
        unreadable = lambda err: report(f"{err.filename}: cannot read this folder ({err.strerror})")
        for folder, subfolders, files in os.walk(top, onerror=unreadable):
            subfolders.sort()
            for file in sorted(files):
                path = Path(folder) / file
                if path.suffix.lower() not in FOLDER_EXTENSIONS:
                    continue
                if earlier_output(path):
                    skipped += 1
                    continue
                found.append((path, path.relative_to(top)))
    return found, skipped


def earlier_output(path: Path) -> bool:
    """Whether `path` is an output an earlier run of colorize.py wrote (a PNG or a video)."""
    return is_colorize_output(path) or is_video_output(path)


def plan_outputs(inputs: list[tuple[Path, Path]], output: str | None, compare: bool) -> list[Job]:
    """Every output name, decided before anything is written.

    A name is free unless it is an input, another planned output, or an existing path that is
    not an earlier output of colorize.py (the user's file, a folder): then the next candidate is
    tried, <stem>_<ext>.png (photo.jpg -> photo_jpg.png), then numbered ones.
    """
    taken = {path.resolve() for path, _ in inputs}

    def claim(folder: Path, names: list[str], suffix: str) -> Path:
        numbered = (f"{names[-1]}_{k}" for k in itertools.count(2))
        for name in itertools.chain(names, numbered):
            candidate = folder / f"{name}{suffix}"
            if candidate.resolve() not in taken and (not candidate.exists() or earlier_output(candidate)):
                taken.add(candidate.resolve())
                return candidate

    jobs = []
    for path, place in inputs:
        folder = Path(output) / place.parent if output else path.parent
        tail, ext = ("" if output else "_color"), path.suffix.lower().lstrip(".") or "noext"
        suffix = path.suffix.lower() if is_video(path) else ".png"  # a video stays in its container
        out = claim(folder, [f"{path.stem}{tail}", f"{path.stem}_{ext}{tail}"], suffix)
        base = out.stem.removesuffix(tail) if tail else out.stem
        jobs.append(Job(path, out, claim(folder, [f"{base}_compare"], suffix) if compare else None))
    return jobs


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error(text: str) -> None:
    print(f"colorize.py: error: {one_line(text)}", file=sys.stderr)


def failure_reason(err: Exception, job: Job) -> str:
    """One line on why colorizing job.path failed."""
    if isinstance(err, ImageError) or (isinstance(err, OSError) and not err.strerror):
        return str(err)
    if isinstance(err, OSError):
        return f"{job.path}: cannot write {err.filename or job.out} ({err.strerror})"
    if isinstance(err, MemoryError):
        return f"{job.path}: not enough memory to colorize it"
    return f"{job.path}: failed ({err.__class__.__name__}: {err})"


def colorize_stdin(model, work_size: int, output: str | None) -> int:
    """One image from stdin -> its colorized PNG on stdout, or in the file `output` (atomically)."""
    try:
        rgb, alpha = photo_arrays(decode_image(sys.stdin.buffer.read(), "stdin"), "stdin")
        png = encode_png(colorize_array(model, rgb, work_size), alpha, "colorized from stdin")
        if output:
            atomic_write_bytes(output, png)
        else:
            sys.stdout.buffer.write(png)
            sys.stdout.buffer.flush()
    except (ImageError, OSError) as err:
        error(f"{output}: {err.strerror}" if isinstance(err, OSError) and err.strerror else err)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
        backend.use_device(args.device)
        fast.set_engine(args.conv)
        model, work_size = load_colorizer(args.weights)
    except (ValueError, OSError, backend.DeviceError) as err:  # CorruptFileError is a ValueError
        error(f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else err)
        return 2
    work_size = args.work_size or work_size
    if args.inputs == ["-"]:
        return colorize_stdin(model, work_size, args.output)
    if "-" in args.inputs:
        error("- (stdin) must be the only input")
        return 2
    folder_errors = []
    inputs, skipped = find_inputs(args.inputs, lambda line: (folder_errors.append(line), error(line)))
    if skipped:
        print(f"skipped {skipped} earlier output{'s' * (skipped > 1)} of colorize.py")
    if not inputs:
        error("no image files found in the given folders")
        return 1
    failures = len(folder_errors)
    for done, job in enumerate(plan_outputs(inputs, args.output, args.compare)):
        try:
            if is_video(job.path):
                colorize_video(model, job.path, job.out, work_size, job.compare, smooth=not args.no_smooth)
            else:
                colorize_file(model, job.path, job.out, work_size, job.compare)
            print(f"{job.path} -> {job.out}")
            frames = frame_count(job.path)
            if frames > 1:
                print(f"colorize.py: warning: {job.path} has {frames} frames; only the first was colorized",
                      file=sys.stderr)
        except KeyboardInterrupt:
            print(f"colorize.py: interrupted after {done} of {len(inputs)} images", file=sys.stderr)
            return 130
        except Exception as err:  # one bad file must not stop the batch
            failures += 1
            error(failure_reason(err, job))
    if failures:
        print(f"colorize.py: {failures} of {len(inputs) + len(folder_errors)} inputs failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
