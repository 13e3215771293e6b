"""Colorize grayscale (or color) photos with a trained nanocolor model.

Writes <name>_color.png beside each input, or OUT/<name>.png with --output OUT (folders are
searched recursively and their subfolders mirrored under OUT); the output has the input's exact
size and lightness, and keeps its alpha channel. No input and no file colorize.py did not write
is ever replaced: a name that is taken gets a distinct one (<name>_<ext>.png, then a number).
Outputs of earlier runs found in a folder are recognised and skipped. `-` reads one image from
stdin and writes the PNG to stdout (or to the file --output names, which replaces an existing
file only with --overwrite, and never the input itself). Examples:
    python colorize.py old_photo.jpg               # or: nanocolor colorize old_photo.jpg
    python colorize.py scans/ --output colorized/ --compare
    python colorize.py film.mp4                    # film_color.mp4; --no-smooth: each frame alone
    cat scan.jpg | nanocolor colorize - > scan_color.png

A video (.mp4, .mkv, .mov, ...; needs nanocolor[video]) gives <name>_color.mp4, in its own
container, with steady colors and its audio (nanocolor/video.py).
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nanocolor import backend, engine, options
from nanocolor.data import IMAGE_EXTENSIONS, ImageError, decode_image, photo_arrays
from nanocolor.infer import (DEFAULT_WEIGHTS, MAX_WORK_SIZE, check_work_size, colorize_array, colorize_file,
                             compare_png, encode_png, frame_count, is_colorize_output, load_colorizer)
from nanocolor.pipes import ends_quietly_on_closed_stdout, print_listing
from nanocolor.serialize import atomic_write_bytes
from nanocolor.video import VIDEO_EXTENSIONS, colorize_video, is_video, is_video_output

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
    p.add_argument("--overwrite", action="store_true",
                   help="with - and --output FILE: replace FILE (and FILE's _compare.png) if it exists; "
                        "the input itself is never replaced")
    p.add_argument("--compare", action="store_true",
                   help="also write <name>_compare.png: grayscale | original | colorized "
                        "(with -: beside the --output FILE; for a video, <name>_compare.mp4: "
                        "grayscale | colorized)")
    p.add_argument("--no-smooth", action="store_true",
                   help="videos: colorize every frame alone (colors flicker; for comparison)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                   help="model weights (.npz from train.py: model.npz or checkpoint.npz), or the name of a "
                        "shipped model (colornet-v3, colornet-v2, colornet-v1: earlier ones); default: the shipped model")
    p.add_argument("--work-size", type=int, default=None,
                   help="longer side, in pixels, at which the network predicts color "
                        "(default: the one stored with the weights, 128 for the shipped model, else the "
                        f"training size x 2; at most {MAX_WORK_SIZE})")
    p.add_argument("--chroma-gain", type=float, default=None, metavar="GAIN",
                   help="multiply the predicted a*b* by GAIN: above 1 bolder colors, less faithful "
                        "(default: the one stored with the weights, else 1; for the shipped model 1, times "
                        "the gain of the photo's kind, chosen on validation photos; see docs/training.md)")
    engine.add_options(p)
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """ValueError or OSError, one line each, for settings that would fail every image."""
    check_work_size(args.work_size)
    options.check_number("--chroma-gain", args.chroma_gain, low=0)
    if args.inputs == ["-"]:  # one image from stdin: --output is the file to write
        check_stdin_outputs(args)
        return
    if args.overwrite:
        raise ValueError("--overwrite is for - (stdin) with --output FILE; outputs of files and folders "
                         "get distinct names and never replace a file")
    if args.output is None:
        return
    output = Path(args.output)
    options.check_output_folder(output)
    if not output.is_dir() and output.suffix.lower() in FOLDER_EXTENSIONS:
        raise ValueError(f"--output {output} looks like a file name; --output takes a folder "
                         f"(each output is named after its input)")


def stdin_outputs(output: str | None, compare: bool) -> tuple[Path | None, Path | None]:
    """Where `-` writes: the --output file (None: stdout) and, with --compare, <stem>_compare.png beside it."""
    if output is None:
        return None, None
    out = Path(output)
    return out, (out.with_name(f"{out.stem}_compare.png") if compare else None)


def replaceable(path: Path) -> bool:
    """Whether colorize may write `path`: nothing is there, or an earlier output of colorize.py."""
    return not path.exists() or earlier_output(path)


def check_stdin_outputs(args: argparse.Namespace) -> None:
    """`-` writes no file but the ones it was asked to: the user's files only with --overwrite, the input never."""
    if args.compare and args.output is None:
        raise ValueError("--compare with - needs --output FILE: stdout takes the colorized PNG alone")
    out, compare = stdin_outputs(args.output, args.compare)
    for path in filter(None, (out, compare)):
        options.check_output_folder(path.parent)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; with -, --output names the PNG file to write",
                                    str(path))
        if is_stdin(path):
            raise FileExistsError(errno.EEXIST, "it is the input itself (stdin); refusing to overwrite it",
                                  str(path))
        if not (args.overwrite or replaceable(path)):
            raise FileExistsError(errno.EEXIST, "exists and colorize.py did not write it; "
                                                "--overwrite replaces it", str(path))


def is_stdin(path: Path) -> bool:
    """Whether `path` is the very file stdin reads (`< photo.png`)."""
    try:
        return path.exists() and os.path.samestat(os.fstat(sys.stdin.fileno()), os.stat(path))
    except (AttributeError, ValueError, OSError):  # stdin is a pipe, closed, or not a file at all
        return False


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
            if candidate.resolve() not in taken and replaceable(candidate):
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


def colorize_stdin(model, work_size: int, output: Path | None, compare: Path | None) -> int:
    """One image from stdin -> its colorized PNG on stdout, or in the file `output` (atomically),
    and the compare picture in the file `compare`. A closed stdout is left to the caller."""
    try:
        rgb, alpha = photo_arrays(decode_image(sys.stdin.buffer.read(), "stdin"), "stdin")
        colorized = colorize_array(model, rgb, work_size)
        png = encode_png(colorized, alpha, "colorized from stdin")
        if output:
            atomic_write_bytes(output, png)
        else:
            sys.stdout.buffer.write(png)
            sys.stdout.buffer.flush()
        if compare:
            atomic_write_bytes(compare, compare_png(rgb, colorized, "stdin"))
    except BrokenPipeError:
        raise
    except (ImageError, OSError) as err:
        error(f"{err.filename or output}: {err.strerror}" if isinstance(err, OSError) and err.strerror else err)
        return 1
    return 0


def refused_folders(jobs: list[Job]) -> dict[Path, str]:
    """The output folders that cannot take a file, each with one line on why (checked once per folder;
    a compare picture goes beside its output)."""
    refused = {}
    for folder in sorted({job.out.parent for job in jobs}):
        try:
            options.check_output_folder(folder)
        except OSError as err:
            refused[folder] = f"{err.filename}: {err.strerror}"
    return refused


@ends_quietly_on_closed_stdout
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
        backend.use_device(args.device)
        engine.set_conv(args.conv)
        model, work_size = load_colorizer(args.weights)
        if args.chroma_gain is not None:
            model.chroma_gain = args.chroma_gain
    except (ValueError, OSError, backend.DeviceError) as err:  # CorruptFileError is a ValueError
        error(f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else err)
        return 2
    work_size = args.work_size or work_size
    if args.inputs == ["-"]:
        return colorize_stdin(model, work_size, *stdin_outputs(args.output, args.compare))
    if "-" in args.inputs:
        error("- (stdin) must be the only input")
        return 2
    folder_errors = []
    inputs, skipped = find_inputs(args.inputs, lambda line: (folder_errors.append(line), error(line)))
    if skipped:
        print_listing(f"skipped {skipped} earlier output{'s' * (skipped > 1)} of colorize.py")
    if not inputs:
        error("no image files found in the given folders")
        return 1
    failures = len(folder_errors)
    jobs = plan_outputs(inputs, args.output, args.compare)
    refused = refused_folders(jobs)
    for reason, count in Counter(refused[job.out.parent] for job in jobs if job.out.parent in refused).items():
        error(f"{reason}; {count} input{'s' * (count > 1)} not colorized")
    for done, job in enumerate(jobs):
        if job.out.parent in refused:
            failures += 1
            continue
        try:
            if is_video(job.path):
                colorize_video(model, job.path, job.out, work_size, job.compare, smooth=not args.no_smooth)
            else:
                colorize_file(model, job.path, job.out, work_size, job.compare)
            print_listing(f"{job.path} -> {job.out}")
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
