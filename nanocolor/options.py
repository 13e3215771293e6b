"""Up-front checks of the command lines' settings, before any photo is read.

Each problem is one exception whose message is one line naming the option or the path:
ValueError for a number out of range, OSError (with its filename set) for an output place that
cannot be written. `given_options` tells which options a command line spelled out, so that
`train.py --resume` can name the ones the run cannot change instead of ignoring them silently.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import tempfile
from pathlib import Path

from .serialize import load_npz


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options that `argv` sets explicitly (defaults left out).

    argparse fills in a default only where the namespace lacks the attribute, so every option
    still holding the marker after parsing was not on the command line.
    """
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def check_number(option: str, value: float | None, low: float | None = None, high: float | None = None,
                 above: bool = False, below: bool = False) -> None:
    """Raise ValueError naming `option` unless value is None, or finite and within the bounds:
    low <= value <= high, or strictly beyond low with `above` and strictly under high with `below`."""
    if value is None:
        return
    if math.isfinite(value) and (low is None or (value > low if above else value >= low)) and \
            (high is None or (value < high if below else value <= high)):
        return
    bounds = [f"{'above' if above else 'at least'} {low}" if low is not None else "",
              f"{'below' if below else 'at most'} {high}" if high is not None else ""]
    finite = "" if math.isfinite(value) else "finite and "
    raise ValueError(f"{option} must be {finite}{' and '.join(b for b in bounds if b)}, got {value}")


def parse_widths(text: str, option: str = "--widths") -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128); ValueError naming `option` for anything but positive integers."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ValueError(f"{option} must be positive integers separated by commas, got {text!r}")
    return widths


def add_split_options(p: argparse.ArgumentParser, size_help: str) -> None:
    """--size, --crop-margin, --val-fraction, --seed as train.py's: a head fitted beside a trained
    net (classhead.py, kindhead.py) loads the photos as the net's run did and leaves out the same
    validation split."""
    p.add_argument("--size", type=int, default=112, help=f"{size_help} (default 112)")
    p.add_argument("--crop-margin", type=int, default=8, help="as train.py's, for its split (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="the share of photos train.py held out: left out here (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed, as train.py's; also the sampling's")


def check_new_file(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output file that exists (nothing is overwritten) or a place
    that cannot take it (check_output_folder)."""
    if os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "exists: choose a new --out (nothing is overwritten)", str(path))
    check_output_folder(os.path.dirname(os.path.abspath(path)))


def check_output_folder(folder: str | os.PathLike) -> None:
    """Prove that a file can be written at `folder` (created later if missing), before any work.

    Raises OSError whose filename is the offending path: `folder` or one of its parents is a
    file, or the nearest existing folder refuses a new file (permissions, read-only, full disk).
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == folder else f"cannot hold {folder}: it is a file"
        raise NotADirectoryError(errno.ENOTDIR, what, str(existing))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OSError(err.errno, f"cannot write there ({err.strerror})", str(existing)) from None


def run_settings(run: str | os.PathLike) -> tuple[dict, int]:
    """The training settings stored in a run folder's checkpoint and the epochs it has finished
    (CorruptFileError if unusable)."""
    _, meta = load_npz(Path(run) / "checkpoint.npz", kinds=("checkpoint",))
    return meta.get("train_config") or {}, int(meta.get("epoch") or 0)


# Settings a run keeps for life: (TrainConfig field, option); resuming with another value of one
# would change the data split, the batches or the model under the saved state. (--data may name
# the run's photos' new place: train.py checks that they are the same photos.)
RUN_SETTINGS = (("size", "--size"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("widths", "--widths"),
                ("loss", "--loss"), ("class_weight", "--class-weight"), ("rebalance", "--rebalance"),
                ("chroma_match", "--chroma-match"), ("repeat", "--repeat"), ("seed", "--seed"),
                ("val_fraction", "--val-fraction"), ("limit", "--limit"), ("arch", "--arch"),
                ("crop_margin", "--crop-margin"), ("schedule", "--schedule"), ("warmup", "--warmup"),
                ("gan", "--gan"), ("gan_lambda", "--gan-lambda"), ("critic_lr", "--critic-lr"),
                ("critic_warmup", "--critic-warmup"), ("critic_widths", "--critic-widths"))


def folders(value) -> list[str]:
    """A data setting (one folder or a list of them) as a list of absolute folder names."""
    if value is None:
        return []
    return [str(Path(v).resolve()) for v in ([value] if isinstance(value, (str, os.PathLike)) else value)]


def data_folder_holding(place: str | os.PathLike, data) -> str | None:
    """The data folder that `place` is or lies inside, else None."""
    place = Path(place).resolve()
    return next((folder for folder in folders(data) if place == Path(folder) or Path(folder) in place.parents), None)


def check_outside(out: str | os.PathLike, data) -> None:
    """ValueError when the run folder `out` is one of the data folders or lies inside one: the next
    run on that data would train on this run's preview.png."""
    folder = data_folder_holding(out, data)
    if folder is not None:
        raise ValueError(f"--out {out} is inside the data folder {folder}: later runs on it would train "
                         f"on this run's preview.png; pick an --out outside it")


def check_repeat(repeat: dict | None, data) -> None:
    """Every --repeat folder is an existing folder inside a --data folder (ValueError naming it)."""
    for folder in repeat or {}:
        if not Path(folder).is_dir() or data_folder_holding(folder, data) is None:
            raise ValueError(f"--repeat {folder}: not a folder inside --data {' '.join(folders(data))}")


def ignored_on_resume(wanted: dict, stored: dict) -> list[str]:
    """'--size 32 (the run has 64)' for every setting in `wanted` (field -> value the command line
    gave) that differs from the run's `stored` one: --resume keeps the run's own."""
    ignored = []
    for key, option in RUN_SETTINGS:
        if key not in wanted or key not in stored:
            continue
        given, kept = wanted[key], stored[key]
        if key in ("widths", "critic_widths"):
            given, kept = tuple(given), tuple(kept)
        if given != kept:
            show = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            ignored.append(f"{option} {show(given)} (the run has {show(kept)})")
    return ignored
