"""Scratch buffers: temporaries reused from one call to the next instead of allocated anew.

A training step of the fast engine then allocates little besides its results (the outputs and
gradients it hands back, which the caller owns). Buffers are per tag and per thread, so work
split over the CPU workers of nanocolor.fast.parallel gets one per worker.
"""
from __future__ import annotations

import threading

import numpy as np

from ..backend import array_module

_buffers: dict = {}


def scratch(tag: str, shape: tuple, dtype, like):
    """A view of shape `shape` into the calling thread's reusable buffer for `tag`.

    One buffer per (tag, thread, dtype, array module), grown to the largest size asked for and
    shared by all layers, which run one after another. Scratch holds temporaries only: its
    contents are undefined until written, and the next call with the same tag overwrites them.
    """
    xp = array_module(like)
    dtype = xp.dtype(dtype)
    size = int(np.prod(shape))
    key = (tag, threading.get_ident(), dtype.str, xp.__name__)
    buf = _buffers.get(key)
    if buf is None or buf.size < size:
        buf = _buffers[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)
