"""The convolution algorithms' choosers and their one entry point: which algorithm convolves
a given x by given weights (conv2d_path, upsampled_conv_path), and conv2d_forward / backward
by that algorithm. Shapes: x, dout (N, H, W, C) or (N, H, W, F); w (k, k, C, F); b (F,). A conv
cache is a tuple whose first item names the algorithm that made it.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import gemm, parallel, strided, upsampled, winograd, winograd4
from .helpers import leaky_relu_into

CONVS = ("auto", "gemm", "winograd", "winograd4")
WINOGRAD_MIN_CHANNELS = 16  # thinner convs spend more time in Winograd's transforms than they save


def conv2d_path(x, w, conv: str = "auto") -> str:
    """The algorithm ("gemm", "winograd" or "winograd4") that convolves x (N, H, W, C) with w (k, k, C, F)."""
    k, _, C, F = w.shape
    H, W = x.shape[1], x.shape[2]
    if conv not in CONVS:
        raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
    if conv == "gemm" or not winograd.applies(k, H, W):
        return "gemm"
    if conv == "winograd":
        return "winograd"
    if conv == "winograd4":
        return "winograd4" if winograd4.applies(k, H, W) else "gemm"
    # auto: Winograd pays off with enough channels and one BLAS thread per call (the worker pool
    # hands out its 16 or 36 GEMMs; with OpenBLAS threading each call, they wait for descheduled threads).
    if min(C, F) < WINOGRAD_MIN_CHANNELS or not isinstance(x, np.ndarray) or not parallel.blas_single_threaded():
        return "gemm"
    # F(4x4, 3x3) measured fastest forward + backward on every 3x3 conv of both networks, 1.0-1.6x
    # F(2x2, 3x3) (64 -> 128 at 64x64 batch 16: 134 vs 211 ms), thin outputs included (128 -> 32:
    # 54 ms, as multiply-then-shift). On sizes that do not divide by 4, gemm.py multiplies first
    # for few outputs (4F <= C): faster there both ways than F(2x2, 3x3).
    if winograd4.applies(k, H, W):
        return "winograd4"
    return "gemm" if gemm.multiplies_first(C, F, k) else "winograd"


def upsampled_conv_path(x_low, skip, w, conv: str = "auto", inference: bool = False) -> str | None:
    """How to convolve concat(upsample2x(x_low), skip) (or upsample2x(x_low) alone, skip None)
    by w (k, k, Cu + Cs, F) without making the upsampled map, or None (upsample, join, then conv2d_path):

    "shift"            inference, where the joined map's conv would multiply first by gemm.py
                       (the head: few outputs): x_low's products added into skip's before the shifts
    "phases"           auto, no skip: four 2x2 phase convs at the low resolution (upsampled.py)
    "winograd4"        auto, the skip's conv by F(4x4): one F(4x4) conv, x_low transformed directly
    "phases+skip"      auto, else: the skip's conv by its own path, x_low's phases added into it
    """
    N, h, w_, _ = x_low.shape
    k, _, C, F = w.shape
    if skip is not None and inference and gemm.multiplies_first(C, F, k):
        joined = array_module(x_low).broadcast_to(x_low[:1, :1, :1, :1], (N, 2 * h, 2 * w_, C))  # a shape, no data
        if conv2d_path(joined, w, conv) == "gemm":
            return "shift"
    if conv != "auto" or not isinstance(x_low, np.ndarray) or not upsampled.applies(k):
        return None
    if skip is None:
        return "phases"
    return "winograd4" if conv2d_path(skip, w[:, :, x_low.shape[-1]:], conv) == "winograd4" else "phases+skip"


def conv2d_forward(x, w, b, path: str, relu: bool = False, inference: bool = False,
                   slope: float | None = None) -> tuple:
    """'same' convolution by `path` ("gemm", "winograd" or "winograd4"): (out (N, H, W, F), cache);
    with `relu`, max(out, 0) computed in the GEMMs' epilogue; with `slope`, the LeakyReLU
    max(out, slope * out) (in Winograd F(4x4)'s epilogue, else one more pass). With `inference`
    no backward will read the cache, so it keeps only what it costs nothing to keep (Winograd
    F(4x4) keeps its transformed input for a backward otherwise)."""
    if path == "winograd4":
        return winograd4.forward(x, w, b, relu, keep_v=not inference, slope=slope)
    if path == "winograd":
        out, cache = winograd.forward(x, w, b, relu)
    elif path == "gemm":
        out, cache = gemm.forward(x, w, b, relu)
    else:
        raise ValueError(f"the fast engine has no conv path {path!r}")
    if slope is not None:
        parallel.map_elementwise(lambda part: leaky_relu_into(out[part], slope), out)
    return out, cache


def conv2d_backward(dout, w, cache: tuple, input_grad: bool = True) -> tuple:
    """(dx (N, H, W, C), or None without input_grad; dW (k, k, C, F); db (F,)) by the forward's path."""
    if cache[0] == "winograd":
        return winograd.backward(dout, cache, input_grad)
    if cache[0] == "winograd4":
        return winograd4.backward(dout, cache, input_grad)
    if cache[0] == "strided":
        return strided.backward(dout, cache, w, input_grad)
    return gemm.backward(dout, cache, w, input_grad)

