"""Shared fixtures: a CPU backend for every test, seeded randomness, tiny images and the CLIs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanocolor import parallel

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    """Every test runs on NumPy, whatever $NANOCOLOR_DEVICE says in the caller's shell."""
    from nanocolor import backend
    monkeypatch.delenv(backend.DEVICE_ENV, raising=False)
    backend.use_device("cpu")
    yield
    backend.use_device("cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def colorful_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth red/green/blue ramps plus noise, strongly colored (mean chroma >> 3)."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    255 * (1 - x / max(width - 1, 1))], axis=-1)
    rgb += r.normal(0, 10, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def gray_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with R = G = B: a colorless photo."""
    g = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def save_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    """Write a uint8 (H, W, 3) or (H, W) array as an image file; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def run_script(script: str, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run train.py / colorize.py with this interpreter from the repo root, single-threaded, on the CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    env.pop("NANOCOLOR_DEVICE", None)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=[1, 3], ids=["1worker", "3workers"])
def workers(request):
    """Run the test with the layers' work on the calling thread, then split over 3 workers."""
    parallel.set_workers(request.param)
    yield request.param
    parallel.set_workers(1)
