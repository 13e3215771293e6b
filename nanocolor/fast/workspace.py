"""Scratch buffers: temporaries reused from one call to the next instead of allocated anew; and
prepared weights, made once per set of weights for inference.

A training step of the fast engine then allocates little besides its results (the outputs and
gradients it hands back, which the caller owns). Buffers are per tag and per thread, so work
split over the CPU workers of nanocolor.fast.parallel gets one per worker.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

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


PREPARED_ENTRIES = 64  # weight sets kept: every conv of a network, with room for a second network
_prepared: OrderedDict = OrderedDict()
_prepared_lock = threading.Lock()


def prepared(tag: str, inputs: tuple, make: Callable):
    """make(*inputs), kept and handed out again while `inputs` (NumPy arrays) hold the same values.

    For weights that inference transforms at every forward pass (the Winograd filter transform,
    BatchNorm folded into a conv) although they change only between training steps: repeated
    forward passes over the same weights (a folder of photos, the bench) make them once. Every
    call compares the inputs with copies taken when the result was made, one read of the
    weights (a fraction of what making the result costs), so weights changed in place are never
    served stale. The least recently used of more than PREPARED_ENTRIES entries is dropped.
    """
    key = (tag,) + tuple((a.__array_interface__["data"][0], a.shape, a.dtype.str) for a in inputs)
    with _prepared_lock:
        entry = _prepared.get(key)
        if entry is not None:
            _prepared.move_to_end(key)
    if entry is not None and all(np.array_equal(a, kept) for a, kept in zip(inputs, entry[0])):
        return entry[1]
    result = make(*inputs)
    with _prepared_lock:
        _prepared[key] = ([a.copy() for a in inputs], result)
        while len(_prepared) > PREPARED_ENTRIES:
            _prepared.popitem(last=False)
    return result
