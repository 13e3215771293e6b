"""The `nanocolor` command and `python -m nanocolor`: version, help, dispatch to each tool, and the
same results as the repository's scripts."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, colorful_rgb, run_script, save_image
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
    for command in ("colorize", "train", "evaluate", "serve"):
        assert f"  {command} " in result.stdout
    bare = run_nanocolor()
    assert bare.returncode == 2 and "usage: nanocolor COMMAND" in bare.stderr
    unknown = run_nanocolor("paint")
    assert unknown.returncode == 2 and unknown.stderr == (
        "nanocolor: error: unknown command 'paint'; choose from colorize, train, evaluate, serve\n")


@pytest.mark.parametrize("command", ["colorize", "train", "evaluate", "serve"])
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
