"""Shared fixtures and helpers: a CPU backend for every test, seeded randomness, the worker
count, tiny images, gradient checks, the Adam reference, and the command-line programs."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanocolor.fast import parallel
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.layers import Conv2d
from nanocolor.model import ColorNet

REPO = Path(__file__).resolve().parent.parent
GRAD_TOL = 1e-6  # relative error of a float64 backward pass against central differences


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


def make_photos(folder: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """n colorful PNG photos 000.png, 001.png, ... of size x size in `folder`."""
    for i in range(n):
        save_image(folder / f"{i:03d}.png", colorful_rgb(size, size, seed=seed + i))
    return folder


def save_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    """Write a uint8 (H, W, 3) or (H, W) array as an image file; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


# -- layers ----------------------------------------------------------------------------------------

def make_conv(c_in: int, c_out: int, k: int = 3, seed: int = 0, dtype=np.float64) -> Conv2d:
    """A k x k Conv2d with seeded weights and a seeded non-zero bias (so its gradient is exercised).
    The engine that computes it is the process-wide one (nanocolor.fast.use_engine)."""
    conv = Conv2d(c_in, c_out, k, rng=np.random.default_rng(seed), dtype=dtype)
    conv.params["b"] = np.random.default_rng(seed + 1).standard_normal(c_out).astype(dtype)
    return conv


def check_gradients(layer, x: np.ndarray, rng: np.random.Generator, tol: float = GRAD_TOL):
    """Gradcheck `layer` at input x (N, H, W, C), float64: dx (unless the layer returns None) and
    every parameter gradient against central differences. Returns dx.

    The scalar is f = sum(forward(x) * dout) for a fixed random dout, so df/dout is dout.
    """
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    f = lambda: float(np.sum(layer.forward(x) * dout))
    layer.forward(x)
    dx = layer.backward(dout.copy())
    analytic = {name: np.array(g, copy=True) for name, g in layer.grads.items()}
    kind = type(layer).__name__
    if dx is not None:
        assert dx.shape == x.shape and dx.dtype == np.float64
        err = relative_error(dx, numeric_gradient(f, x))
        assert err < tol, f"{kind} dx relative error {err:.2e}"
    for name, p in layer.params.items():
        assert analytic[name].shape == p.shape
        err = relative_error(analytic[name], numeric_gradient(f, p))
        assert err < tol, f"{kind} d{name} relative error {err:.2e}"
    return dx


def adam_reference(p, grads: list, lr: float, b1: float, b2: float, eps: float) -> list:
    """Kingma & Ba, Algorithm 1, written out for one parameter (a float or an array) and its
    gradient at each step: the parameter after every step."""
    m = v = 0.0
    trajectory = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        trajectory.append(p)
    return trajectory


@pytest.fixture
def use_workers():
    """parallel.set_workers for this test; one worker again afterwards, whether it passed or failed."""
    yield parallel.set_workers
    parallel.set_workers(1)


@pytest.fixture(params=[1, 3], ids=["1worker", "3workers"])
def workers(request, use_workers):
    """Run the test with the layers' work on the calling thread, then split over 3 workers."""
    use_workers(request.param)
    return request.param


# -- the command-line programs ---------------------------------------------------------------------

def script_env(**extra: str) -> dict:
    """The environment of a train.py / colorize.py subprocess: single-threaded, on the CPU, plus `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO), **extra)
    env.pop("NANOCOLOR_DEVICE", None)
    return env


def run_script(script: str, *args, cwd: Path = REPO, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run train.py / colorize.py with this interpreter (from the repo root by default), env as script_env."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=script_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def with_closed_stdout(command: list, buffered: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run this Python with `command` (a script and its arguments, or -m ...), stdout a pipe whose
    reader has already gone (`| head -1` at its first write), env as script_env; stderr is captured.
    buffered: stdout as Python sets up a pipe (a write fails at the flush), else as with
    $PYTHONUNBUFFERED (it fails at the write)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = script_env()
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    try:
        return subprocess.run([sys.executable, *map(str, command)], stdout=write_end, stderr=subprocess.PIPE,
                              env=env, text=True, timeout=120, **kwargs)
    finally:
        os.close(write_end)


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *map(str, args)]


def run_train(*args, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return run_script("train.py", *args, cwd=cwd, timeout=timeout, **env)


def load_script(script: str, name: str):
    """colorize.py / train.py imported as module `name`, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


colorize_cli = load_script("colorize.py", "colorize_cli")


def run_colorize(capsys, *args) -> tuple[int, str, list[str]]:
    """colorize.py's main in this process: (exit code, stdout, stderr lines)."""
    code = colorize_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def tiny_weights(path: Path, widths=(4, 8), seed: int = 0) -> Path:
    """A tiny untrained model file, saved as train.py saves one (training size 8)."""
    ColorNet(widths, seed=seed, arch="seed").save(path, train_size=8)
    return path
