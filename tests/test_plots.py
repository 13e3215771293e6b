"""curves.png: drawn from a run's log rows when matplotlib is there, skipped (None) when not."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from nanocolor.plots import curves_png

HISTORY = [{"epoch": e, "train_loss": 0.03 / e, "val_loss": 0.025 / e, "val_psnr": 22 + e} for e in (1, 2, 3)]


def test_curves_are_a_png_picture():
    pytest.importorskip("matplotlib")
    png = curves_png(HISTORY, title="run")
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 100
        colors = np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colors) > 10  # lines and text, not a blank canvas


def test_no_matplotlib_or_no_rows_gives_no_picture(monkeypatch):
    assert curves_png([]) is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert curves_png(HISTORY) is None
