"""docs/walkthrough.md runs: its ```python blocks, executed in order in one namespace.

The pictures the blocks draw go to $WALKTHROUGH_OUT, here a temporary folder. To redraw the
committed pictures: `python tests/test_walkthrough.py docs/walkthrough` from the repository root.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "walkthrough.md"
PICTURES = REPO / "docs" / "walkthrough"
MAX_PICTURE_BYTES = 100_000


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block of a markdown text, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def pictures_shown(text: str) -> list[str]:
    """File names of the pictures the markdown shows from walkthrough/."""
    return re.findall(r"!\[[^\]]*\]\(walkthrough/([^)]+)\)", text)


def run_walkthrough(out: Path) -> None:
    """Execute the blocks from the repository root, pictures into `out`; restore the conv engine."""
    from nanocolor import engine
    text = DOC.read_text(encoding="utf-8")
    conv, cwd, env = engine.get_conv(), os.getcwd(), os.environ.get("WALKTHROUGH_OUT")
    os.environ["WALKTHROUGH_OUT"] = str(out)
    os.chdir(REPO)
    try:
        namespace: dict = {"__name__": "walkthrough"}
        for line, code in code_blocks(text):
            # Padded with blank lines, so a traceback names the block's line in the markdown.
            exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
        engine.set_conv(conv)
        if env is None:
            os.environ.pop("WALKTHROUGH_OUT", None)
        else:
            os.environ["WALKTHROUGH_OUT"] = env


def test_the_walkthrough_runs_and_draws_its_pictures(tmp_path):
    pytest.importorskip("matplotlib", reason="the walkthrough draws with matplotlib: pip install -e '.[plots]'")
    text = DOC.read_text(encoding="utf-8")
    assert len(code_blocks(text)) >= 10
    run_walkthrough(tmp_path)
    shown = pictures_shown(text)
    assert len(shown) >= 2
    for name in shown:
        assert (tmp_path / name).is_file(), f"the walkthrough shows {name} but no block draws it"


def test_the_committed_pictures_are_the_ones_shown_and_small():
    text = DOC.read_text(encoding="utf-8")
    shown = set(pictures_shown(text))
    committed = {p.name for p in PICTURES.glob("*.png")}
    assert shown == committed
    for name in committed:
        assert (PICTURES / name).stat().st_size < MAX_PICTURE_BYTES, name


if __name__ == "__main__":  # python tests/test_walkthrough.py [folder]: draw the pictures there
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else PICTURES).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    run_walkthrough(folder)
    for name in pictures_shown(DOC.read_text(encoding="utf-8")):
        print(folder / name, (folder / name).stat().st_size, "bytes")
