"""A closed stdout, as in `nanocolor --help | head -1`: the commands end quietly, as Unix tools do.

Python ignores SIGPIPE, so a write to a pipe whose reader has gone raises BrokenPipeError (at
the write, or at the flush of a buffered stdout, often only at exit). `ends_quietly_on_closed_stdout`
turns that into the exit status a shell reports for a tool ended by SIGPIPE, with no traceback;
`print_listing` is for lines that only report on work, so that their reader going away stops
the lines and not the work.
"""
from __future__ import annotations

import functools
import io
import os
import sys
from typing import Callable

SIGPIPE_EXIT = 141  # 128 + SIGPIPE (13): what a shell reports for a tool ended by a closed pipe


def silence_stdout() -> None:
    """Send the rest of stdout to /dev/null, so that no later write or flush (at exit) fails again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def ends_quietly_on_closed_stdout(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's main(argv): a closed stdout ends it with SIGPIPE_EXIT and no traceback."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            try:
                return main(argv)
            finally:  # also after --help's SystemExit: a pipe's buffer is written here
                sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()
            return SIGPIPE_EXIT
    return wrapper


def print_listing(line: str) -> None:
    """Print a line that reports on work done; once stdout is closed, later lines go nowhere."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()
