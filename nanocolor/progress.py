"""Progress for long work: a tqdm bar on a terminal, a few plain lines in a log file or CI.

Off a terminal every redraw of a tqdm bar would become a line of its own: ten lines in all say
as much, so `progress_bar` gives PlainProgress there.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

PLAIN_PROGRESS_LINES = 10  # off a terminal: one progress line per tenth of the work


class PlainProgress:
    """tqdm's update/close for a log file or CI: a few plain lines instead of a redrawn bar."""

    def __init__(self, total: int, desc: str, unit: str, file=None, lines: int = PLAIN_PROGRESS_LINES):
        self.total, self.desc, self.unit, self.file, self.done = total, desc, unit, file or sys.stderr, 0
        self.marks = {max(1, round(total * k / lines)) for k in range(1, lines + 1)}
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if any(before < mark <= self.done for mark in self.marks):
            postfix = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}{postfix}", file=self.file, flush=True)

    def set_postfix(self, **values) -> None:
        """Shown at the end of the next plain line, like tqdm's postfix."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    """A tqdm bar on a terminal; PlainProgress lines when stderr is a file or a pipe."""
    if enabled and not sys.stderr.isatty():
        bar = PlainProgress(total, desc, unit)
        bar.done = initial
        return bar
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=False)
