"""Redraw docs/serve.png: the page of `nanocolor serve` in headless Chromium, after two gray photos
(docs/outside/rocket.jpg and chelsea.png) were colorized by the shipped model.

    python docs/make_serve_screenshot.py

It runs the browser test of tests/test_serve.py, which uploads the photos, checks the results and
copies its screenshot to $NANOCOLOR_SCREENSHOT; the picture is then saved again, losslessly
optimized. Needs Debian's chromium and chromium-driver (`apt-get install chromium
chromium-driver`) and the [test,serve] extras (`pip install -e ".[test,serve]"`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "serve.png"
TEST = "tests/test_serve.py::test_page_in_headless_chromium_colorizes_uploaded_photos"


def main() -> int:
    before = TARGET.stat().st_mtime_ns if TARGET.exists() else None
    env = {**os.environ, "NANOCOLOR_SCREENSHOT": str(TARGET)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST],
                            cwd=REPO, env=env)
    if result.returncode != 0:
        return result.returncode
    if not TARGET.exists() or TARGET.stat().st_mtime_ns == before:  # the test was skipped
        print(f"{TARGET} was not written: is Chromium installed?", file=sys.stderr)
        return 1
    with Image.open(TARGET) as shot:
        shot.load()
    shot.save(TARGET, optimize=True)
    print(TARGET, TARGET.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
