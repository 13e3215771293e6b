"""The `nanocolor` command (also `python -m nanocolor`): one entry point for every tool.

    nanocolor colorize photo.jpg          # colorize.py
    nanocolor train --data ~/photos       # train.py
    nanocolor evaluate --data test/       # nanocolor.evaluate
    nanocolor serve                       # nanocolor.serve: a local web page
    nanocolor --version

Each command is the `main(argv)` of module nanocolor.<command>. `colorize` and `train` still live
in the repository's colorize.py and train.py; until they move into the package, they are loaded
from the source checkout the package was installed from (`pip install -e .`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from . import __version__

COMMANDS = {
    "colorize": "colorize photos (writes <name>_color.png beside each input, or into --output)",
    "train": "train a model on a folder of color photos",
    "evaluate": "score a model on a folder of color photos (PSNR, AuC, colorfulness)",
    "serve": "colorize in the browser: a local web page and HTTP API (needs nanocolor[serve])",
}
SOURCE_ROOT = Path(__file__).resolve().parent.parent
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


def _source_script(command: str) -> ModuleType:
    """The repository's <command>.py, imported as a module (for colorize and train, for now)."""
    path = SOURCE_ROOT / f"{command}.py"
    if not path.is_file():
        raise CommandUnavailable(f"`nanocolor {command}` needs {command}.py from a source checkout "
                                 f"installed with `pip install -e .`; it is not at {path}")
    spec = importlib.util.spec_from_file_location(f"_nanocolor_{command}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses, pickle and such look it up there
    spec.loader.exec_module(module)
    return module


def command_main(command: str) -> Callable[[list[str]], int]:
    """The main(argv) function behind `nanocolor <command>`."""
    module_name = f"{__package__}.{command}"
    try:
        return importlib.import_module(module_name).main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in WEB_PACKAGES:
            raise CommandUnavailable(f"`nanocolor {command}` needs the web packages: "
                                     f"pip install 'nanocolor[serve]' (missing: {err.name})") from None
        if err.name != module_name:
            raise
    return _source_script(command).main  # not in the package (yet): the repository's script


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
