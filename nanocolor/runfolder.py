"""A training run's folder on disk: every file the trainer writes, each written atomically.

    checkpoint.npz  weights + Adam state + position (epoch, step), what --resume reads
    model.npz       the latest weights alone (float16), what colorize.py reads
    log.csv         one row per epoch: losses, validation PSNR, seconds
    curves.png      the log as a picture (with matplotlib, the [plots] extra)
    preview.png     fixed validation photos: grayscale | ground truth | colorized
A run killed while writing leaves only a temporary file beside the old one; `clean` removes it.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from PIL import Image

from .images import write_png
from .model import ColorNet
from .plots import curves_png
from .serialize import atomic_write_bytes, load_npz, remove_stale_temp_files, save_npz, temp_files

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_psnr", "seconds"]
FILES = ("checkpoint.npz", "model.npz", "log.csv", "curves.png", "preview.png")


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.npz"

    def clean(self) -> None:
        """Create the folder, and remove temporary files left by a run killed while saving."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            remove_stale_temp_files(self.path / name)

    def other_entries(self) -> list[str]:
        """The sorted names in the folder but the temporary files of a killed run: what a new run must
        not mix with."""
        if not self.path.is_dir():
            return []
        left = {p.name for name in FILES for p in temp_files(self.path / name)}
        return sorted(p.name for p in self.path.iterdir() if p.name not in left)

    def save_checkpoint(self, arrays: dict, **meta) -> None:
        save_npz(self.checkpoint, arrays, kind="checkpoint", **meta)

    def load_checkpoint(self) -> tuple[dict, dict]:
        """(arrays, meta) of checkpoint.npz; CorruptFileError for anything unusable."""
        return load_npz(self.checkpoint, kinds=("checkpoint",))

    def save_model(self, model: ColorNet, **meta) -> None:
        model.save(self.path / "model.npz", **meta)

    def write_log(self, history: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(self.path / "log.csv", buffer.getvalue().encode())

    def write_curves(self, history: list[dict]) -> bool:
        """curves.png from the log rows; False when matplotlib is missing (no picture)."""
        picture = curves_png(history, title=self.path.name)
        if picture is not None:
            atomic_write_bytes(self.path / "curves.png", picture)
        return picture is not None

    def write_preview(self, picture: Image.Image, zoom: int = 1) -> None:
        """preview.png, enlarged `zoom` times (small training images are hard to see)."""
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
        write_png(self.path / "preview.png", picture)
