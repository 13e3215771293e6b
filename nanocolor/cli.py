"""The `nanocolor` command (also `python -m nanocolor`): one entry point for every tool.

    nanocolor colorize photo.jpg          # nanocolor/colorize.py (also python colorize.py)
    nanocolor train --data ~/photos       # nanocolor/train.py (also python train.py)
    nanocolor evaluate --data test/       # nanocolor/evaluate.py
    nanocolor classhead --data ~/photos --out hybrid.npz   # nanocolor/classhead.py
    nanocolor kindhead --data ~/photos --out kinds.npz     # nanocolor/kindhead.py
    nanocolor serve                       # nanocolor/serve.py: a local web page
    nanocolor --version

Each command is the `main(argv)` of module nanocolor.<command>.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from . import __version__
from .pipes import ends_quietly_on_closed_stdout

COMMANDS = {
    "colorize": "colorize photos and videos (writes <name>_color.png or .mp4 beside each input, or into --output)",
    "train": "train a model on a folder of color photos",
    "evaluate": "score a model on a folder of color photos (PSNR, AuC, colorfulness)",
    "classhead": "fit a color-class head beside a trained model's a*b* head, blended in when colorizing",
    "kindhead": "fit a kind head: what kind of photo a trained model colorizes, and a chroma gain for each kind",
    "serve": "colorize in the browser: a local web page and HTTP API (needs nanocolor[serve])",
}
WEB_PACKAGES = ("starlette", "uvicorn", "multipart", "python_multipart", "anyio")


class CommandUnavailable(Exception):
    """A command whose code is not installed here; the message says how to get it."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: nanocolor COMMAND [options]     (nanocolor COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "  --version  print the version", "  --help     show this message"]
    return "\n".join(lines)


def command_main(command: str) -> Callable[[list[str]], int]:
    """The main(argv) function behind `nanocolor <command>`."""
    module_name = f"{__package__}.{command}"
    try:
        return importlib.import_module(module_name).main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in WEB_PACKAGES:
            raise CommandUnavailable(f"`nanocolor {command}` needs the web packages: "
                                     f"pip install 'nanocolor[serve]' (missing: {err.name})") from None
        raise


@ends_quietly_on_closed_stdout
def main(argv: list[str] | None = None) -> int:
    """Dispatch `nanocolor COMMAND ARGS...`; returns the command's exit code (2 for bad usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"nanocolor {__version__}")
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nanocolor: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        run = command_main(command)
    except CommandUnavailable as err:
        print(f"nanocolor: error: {err}", file=sys.stderr)
        return 2
    saved_argv0, sys.argv[0] = sys.argv[0], f"nanocolor {command}"  # usage lines read "nanocolor train ..."
    try:
        return int(run(args) or 0)
    finally:
        sys.argv[0] = saved_argv0
