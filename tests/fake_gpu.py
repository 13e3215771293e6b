"""A stand-in for CuPy that runs on the CPU and is as strict as CuPy about host arrays.

`DeviceArray` wraps a NumPy array the way a CuPy array wraps GPU memory. Like CuPy it refuses to
be turned into a NumPy array implicitly (`np.asarray(device_array)` raises; `.get()` copies to
the host), and refuses to be mixed with a host NumPy array in arithmetic, in a NumPy function, in
`a[...] = host_array`, or in the module's functions (only `asarray`/`array` take host data, as
CuPy's do). NumPy functions called on device arrays only are dispatched to the device, as CuPy's
`__array_function__` does. Installed as the `cupy` module, it lets the CPU test suite run the
`--device gpu` code paths and catch every NumPy-only call on a device array.
"""
from __future__ import annotations

import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class HostDeviceMixError(TypeError):
    """A host NumPy array met a device array (CuPy raises TypeError here too)."""


def _is_host_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.ndim > 0


def _unwrap(value, allow_host: bool = False):
    """Device arrays (also inside lists and tuples) -> their NumPy data; host arrays refused."""
    if isinstance(value, DeviceArray):
        return value._data
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, allow_host) for v in value)
    if _is_host_array(value) and not allow_host:
        raise HostDeviceMixError(f"a host numpy.ndarray {value.shape} was mixed with device arrays")
    return value


def _wrap(value):
    """NumPy results -> device arrays (also inside tuples). A NumPy scalar (a reduction's result, an
    element) becomes a 0-d device array, as CuPy's do; Python numbers and dtypes stay as they are."""
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class DeviceArray(NDArrayOperatorsMixin):
    """An array 'on the device': NumPy data behind CuPy's rules."""

    __array_priority__ = 1000

    def __init__(self, data: np.ndarray):
        self._data = data

    # -- what CuPy refuses ---------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise HostDeviceMixError("implicit conversion to a NumPy array is not allowed: use .get()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    def __setitem__(self, key, value):
        self._data[_unwrap(key)] = _unwrap(value)

    def __float__(self):  # CuPy allows these on one-element arrays (a device-to-host sync)
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __bool__(self):
        return bool(self._data)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return (_wrap(x) for x in self._data)

    def __repr__(self):
        return f"DeviceArray({self._data!r})"

    # -- the rest behaves like the array it wraps ------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._data[_unwrap(key)])

    def get(self) -> np.ndarray:
        """Copy to the host, as cupy.ndarray.get()."""
        return self._data.copy()

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ and the like: NumPy must not see the data
            raise AttributeError(name)
        attr = getattr(self._data, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap(a), **{key: _unwrap(v) for key, v in k.items()}))
        return _wrap(attr)

    @property
    def T(self):
        return DeviceArray(self._data.T)


# -- the module ------------------------------------------------------------------------------------

HOST_INPUT = {"asarray", "array", "ascontiguousarray"}  # CuPy's ways to bring host data over


def _module_function(name: str, func):
    def call(*args, **kwargs):
        allow = name in HOST_INPUT
        if allow and kwargs.get("dtype") is None:
            kwargs.pop("dtype", None)
        result = func(*_unwrap(args, allow), **{k: _unwrap(v, allow) for k, v in kwargs.items()})
        if allow and isinstance(result, np.ndarray) and any(a is result for a in args):
            result = result.copy()  # a transfer makes a new array, never a view of host memory
        return _wrap(result)
    call.__name__ = name
    return call


class _Namespace(types.ModuleType):
    """NumPy's functions (or a submodule's) under CuPy's rules."""

    def __init__(self, name: str, source):
        super().__init__(name)
        self._source = source

    def __getattr__(self, name):
        attr = getattr(self._source, name)
        if isinstance(attr, types.ModuleType):
            return _Namespace(f"{self.__name__}.{name}", attr)
        if callable(attr) and not isinstance(attr, type):
            return _module_function(name, attr)
        return attr  # dtypes, constants (inf, newaxis), scalar types


def make_module() -> types.ModuleType:
    """A fresh `cupy` stand-in: NumPy's namespace, DeviceArray, and the bits of cupy.cuda used."""
    fake = _Namespace("cupy", np)
    fake.ndarray = DeviceArray
    fake.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
    fake.get_array_module = lambda *arrays: fake if any(isinstance(a, DeviceArray) for a in arrays) else np

    class CUDARuntimeError(RuntimeError):
        pass

    class Device:
        def __init__(self, index: int = 0):
            self.index = index

        def use(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

    class MemoryPool:
        def total_bytes(self) -> int:
            return 0

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError)
    fake.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    fake.get_default_memory_pool = MemoryPool
    return fake


def install(monkeypatch) -> types.ModuleType:
    """Make `import cupy` give the stand-in for the rest of a test."""
    fake = make_module()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake
