"""One place that picks the array module: NumPy on the CPU, CuPy on an NVIDIA GPU.

Layer code never imports numpy or cupy for array math; it asks `array_module(x)` for the
module that owns `x`, so the same lines run on both devices.
"""
from __future__ import annotations

import os
from types import ModuleType

import numpy as np

DEVICE_ENV = "NANOCOLOR_DEVICE"
DEVICES = ("cpu", "gpu")

xp: ModuleType = np  # the module new parameters are created with; set by use_device()


class DeviceError(RuntimeError):
    """The requested device cannot be used (unknown name, no CuPy, no GPU)."""


def use_device(device: str | None = None) -> ModuleType:
    """Select 'cpu' (NumPy) or 'gpu' (CuPy); None reads $NANOCOLOR_DEVICE, default 'cpu'."""
    global xp
    device = (device or os.environ.get(DEVICE_ENV) or "cpu").lower()
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        xp = np
        return xp
    try:
        import cupy
    except ImportError:
        raise DeviceError("device 'gpu' needs CuPy: pip install 'nanocolor[gpu]' "
                          "(or the cupy-cuda12x / cupy-cuda13x wheel for your driver)") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("device 'gpu' asked for, but CuPy sees no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError as err:
        raise DeviceError(f"device 'gpu' asked for, but CUDA is not usable: {err}") from None
    xp = cupy
    return xp


def on_host(x) -> bool:
    """True for a NumPy array (host memory), False for a device array."""
    return isinstance(x, np.ndarray)


def array_module(x) -> ModuleType:
    """NumPy or CuPy, whichever owns array `x`."""
    return np if isinstance(x, np.ndarray) else _cupy_module(x)


def _cupy_module(x) -> ModuleType:
    import cupy  # only reached for arrays that are not NumPy's
    return cupy.get_array_module(x)


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of an array from either device."""
    return x if isinstance(x, np.ndarray) else x.get()


def to_device(x: np.ndarray):
    """Move a host array onto the selected device."""
    return xp.asarray(x)
