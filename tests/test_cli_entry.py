"""The `nanocolor` command and `python -m nanocolor`: version, help, dispatch to each tool, and the
same results as the repository's scripts."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, colorful_rgb, run_script, save_image, tiny_weights, with_closed_stdout
from nanocolor import __version__, cli

CONSOLE_SCRIPT = Path(sys.executable).parent / "nanocolor"


def run_nanocolor(*args: str, console: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m nanocolor ARGS` (or the installed `nanocolor` console script), single-threaded."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("NANOCOLOR_DEVICE", None)
    command = [str(CONSOLE_SCRIPT)] if console else [sys.executable, "-m", "nanocolor"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_version_from_python_m_and_the_console_script():
    assert run_nanocolor("--version").stdout == f"nanocolor {__version__}\n"
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT}: reinstall with pip install -e .")
    result = run_nanocolor("--version", console=True)
    assert result.returncode == 0 and result.stdout == f"nanocolor {__version__}\n"
    assert importlib.metadata.version("nanocolor") == __version__


def test_help_lists_every_command_and_bad_usage_exits_2():
    result = run_nanocolor("--help")
    assert result.returncode == 0
    for command in ("colorize", "train", "evaluate", "classhead", "kindhead", "serve"):
        assert f"  {command} " in result.stdout
    bare = run_nanocolor()
    assert bare.returncode == 2 and "usage: nanocolor COMMAND" in bare.stderr
    unknown = run_nanocolor("paint")
    assert unknown.returncode == 2 and unknown.stderr == (
        "nanocolor: error: unknown command 'paint'; choose from colorize, train, evaluate, classhead, kindhead, serve\n")


@pytest.mark.parametrize("command", ["colorize", "train", "evaluate", "classhead", "kindhead", "serve"])
def test_each_command_shows_its_own_help(command):
    result = run_nanocolor(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "--device" in result.stdout
    assert result.stdout.startswith(f"usage: nanocolor {command} ")


def test_nanocolor_colorize_writes_the_same_png_as_colorize_py(tmp_path):
    photo = save_image(tmp_path / "photo.png", colorful_rgb(40, 56))
    by_command = run_nanocolor("colorize", photo, "--output", tmp_path / "a")
    by_script = run_script("colorize.py", photo, "--output", tmp_path / "b")
    assert by_command.returncode == by_script.returncode == 0, by_command.stderr + by_script.stderr
    assert (tmp_path / "a" / "photo.png").read_bytes() == (tmp_path / "b" / "photo.png").read_bytes()


def test_nanocolor_colorize_failure_keeps_the_script_exit_code(tmp_path):
    missing = tmp_path / "missing.png"
    result = run_nanocolor("colorize", missing)
    assert result.returncode == run_script("colorize.py", missing).returncode == 1
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_serve_without_the_web_packages_says_how_to_install_them(monkeypatch, capsys):
    for name in [name for name in sys.modules if name.split(".")[0] == "starlette"] + ["starlette"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails, as if not installed
    monkeypatch.delitem(sys.modules, "nanocolor.serve", raising=False)
    # were starlette still importable, the missing weights would stop the server before it starts
    assert cli.main(["serve", "--weights", "no/such.npz"]) == 2
    assert "pip install 'nanocolor[serve]'" in capsys.readouterr().err


def test_colorize_reads_stdin_and_writes_a_png_to_stdout(tmp_path):
    """`nanocolor colorize -` in a pipe: one image in, its colorized PNG out (or into --output)."""
    import io
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO, colorful_rgb

    buffer = io.BytesIO()
    Image.fromarray(colorful_rgb(23, 31, seed=4)).save(buffer, format="JPEG")
    command = [sys.executable, "-m", "nanocolor", "colorize", "-"]
    result = subprocess.run(command, input=buffer.getvalue(), capture_output=True, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()
    with Image.open(io.BytesIO(result.stdout)) as out:
        assert out.format == "PNG" and out.size == (31, 23)
    result = subprocess.run(command + ["--output", str(tmp_path / "x.png")], input=buffer.getvalue(),
                            capture_output=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout == b"" and (tmp_path / "x.png").is_file()
    bad = subprocess.run(command, input=b"not an image", capture_output=True, cwd=REPO)
    assert bad.returncode == 1 and bad.stdout == b""
    assert bad.stderr.decode().count("\n") == 1 and "stdin: not an image" in bad.stderr.decode()


def closed_stdout_commands(tmp_path: Path) -> dict[str, tuple[list, Path | None]]:
    """Every command, each as it writes to stdout: its help, and its work (with stdin where it reads one)."""
    photos = tmp_path / "photos"
    for i in range(4):
        save_image(photos / f"{i}.png", colorful_rgb(16, 16, seed=i))
    weights = str(tiny_weights(tmp_path / "w.npz"))
    tiny_run = ["--data", photos, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--epochs", "1", "--quiet"]
    commands = {f"{' '.join(args)}": (args, None) for args in (
        ["--help"], ["help"], ["--version"], *([command, "--help"] for command in cli.COMMANDS))}
    commands["colorize -"] = (["colorize", "-", "--weights", weights], photos / "0.png")
    commands["evaluate"] = (["evaluate", "--data", photos, "--weights", weights, "--quiet"], None)
    commands["train"] = (["train", *tiny_run, "--out", tmp_path / "run"], None)
    commands["serve"] = (["serve", "--port", "0", "--weights", weights], None)
    return commands


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("name", ["--help", "help", "--version", "colorize --help", "train --help",
                                  "evaluate --help", "serve --help", "colorize -", "evaluate", "train", "serve"])
def test_a_closed_stdout_ends_every_command_quietly(tmp_path, name, buffered):
    """Defect: `nanocolor --help | head -1` and `nanocolor help | true` ended in a BrokenPipeError
    traceback. Like any Unix tool, a command whose reader has gone ends at once, with no message
    and the exit status of a tool ended by SIGPIPE (128 + 13). (Unbuffered, argparse's own help
    sees its write fail and ignores it: it exits 0, as quietly.)"""
    args, stdin = closed_stdout_commands(tmp_path)[name]
    with open(stdin or os.devnull, "rb") as source:
        result = with_closed_stdout(["-m", "nanocolor", *args], buffered, stdin=source, cwd=tmp_path)
    argparse_help = not buffered and args[0] in cli.COMMANDS and args[1:] == ["--help"]
    assert result.returncode == (0 if argparse_help else 141) and result.stderr == "", result.stderr
    if name == "train":  # it ended after its work was saved: the run can be resumed
        assert (tmp_path / "run" / "checkpoint.npz").is_file()
