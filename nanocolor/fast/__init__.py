"""The fast engine: the numbers of the textbook layers in nanocolor/layers.py, computed sooner.

One knob picks the engine for the whole process (the layers ask at every forward pass):

    nanocolor.fast.set_engine("auto")      the default: Winograd F(4x4, 3x3) (winograd4.py) or
                                           F(2x2, 3x3) where it applies and pays off, "gemm"
                                           elsewhere
    nanocolor.fast.set_engine("im2col")    the textbook code of nanocolor/layers.py for every
                                           layer: im2col + one GEMM, col2im; no threads, no scratch
    nanocolor.fast.set_engine("gemm")      gemm.py: one GEMM per pass and piece of the batch
    nanocolor.fast.set_engine("winograd")  winograd.py: Winograd F(2x2, 3x3) for every 3x3 conv
                                           on even sizes, "gemm" for the other convs

Every engine but "im2col" also runs max-pool, upsample, ReLU (resample.py), BatchNorm and Concat
(norm.py) split over the CPU workers, and a network's Conv (+ BatchNorm) + ReLU blocks in fewer
passes (norm.fused_block_forward). "auto" takes Winograd for 3x3 convs whose channels in and
out both reach WINOGRAD_MIN_CHANNELS: F(4x4, 3x3) on sizes that divide by 4, else F(2x2, 3x3)
on even sizes with more than a quarter as many outputs as inputs (else gemm.py's
multiply-then-shift is faster), on the CPU when BLAS runs one thread per call (the worker pool
of parallel.py hands out the GEMMs): with OpenBLAS threading each call itself, 16 or 36 calls
per pass wait as often for a descheduled thread when other processes share the cores.

The seam the layers call (x, dout: (N, H, W, C) or (N, H, W, F); w (k, k, C, F); b (F,)):
    conv2d_path(x, w)                             -> "im2col" | "gemm" | "winograd" | "winograd4"
    conv2d_forward(x, w, b, path, relu, inference) -> (out, cache)
    conv2d_backward(dout, w, cache, input_grad)   -> (dx or None, dW, db)
    maxpool2d_forward(x) -> (out, cache), maxpool2d_backward(dout, cache) -> dx;
    likewise upsample2d_* and relu_*; maxpool_relu_backward(pool, relu, dout) -> dx or None: a
        ReLU's and the MaxPool2d's after it as one pass; maxpool_backward_plus(pool, dout, plus)
        -> dx + plus or None: the pool's backward with another gradient of its input added
    batchnorm2d_forward(bn, x, relu) -> out, batchnorm2d_backward(bn, dout) -> dx (caches and grads
        in bn; with relu, max(out, 0) in the same pass and dout is the ReLU's output gradient);
    concat_forward(a, b) -> out, concat_backward(dout, split) -> (da, db)
    fused_block_forward(layers, x, inference) -> out or None (norm.py): a network block as fewer
        passes. Conv2d + BatchNorm2d + ReLU: in inference one conv with BatchNorm folded into its
        weights and the ReLU in its epilogue; in training the conv, then BatchNorm with the ReLU
        in its pass. Conv2d + ReLU: the ReLU in the conv's epilogue, caches kept for backward
        unless `inference`.
    fused_in_training(layers) -> bool, fused_block_backward(layers, dout) -> the conv's dx: the
        backward of a Conv2d + BatchNorm2d + ReLU block that fused_block_forward ran in training
    upsample_concat_forward(up, cat, x, skip) -> out or None: Upsample2d + Concat as one pass
    upsampled_block_forward(up, cat, layers, x, skip, inference) -> out or None: Upsample2d (+ Concat
        with skip) and the block after them, its 3x3 conv's upsampled part at x's resolution
        (upsampled.py; under "auto", on the CPU); upsampled_block_backward(layers, dout) -> (dx, dskip)
A cache is a tuple whose first item names the path that made it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from . import gemm, parallel, winograd, winograd4
from .norm import (batchnorm2d_backward, batchnorm2d_forward, concat_backward, concat_forward,  # noqa: F401
                   fused_block_backward, fused_block_forward, fused_in_training, upsample_concat_forward,
                   upsampled_block_backward, upsampled_block_forward)
from .resample import (maxpool2d_backward, maxpool2d_forward, relu_backward, relu_forward,  # noqa: F401
                       upsample2d_backward, upsample2d_forward)

ENGINES = ("auto", "im2col", "gemm", "winograd")
WINOGRAD_MIN_CHANNELS = 16  # thinner convs spend more time in Winograd's transforms than they save
_state = {"engine": "auto"}


def set_engine(name: str) -> None:
    """Compute every layer from now on with engine `name`, one of ENGINES."""
    if name not in ENGINES:
        raise ValueError(f"conv engine must be one of {ENGINES}, got {name!r}")
    _state["engine"] = name


def get_engine() -> str:
    return _state["engine"]


@contextmanager
def use_engine(name: str) -> Iterator[None]:
    """`with use_engine("im2col"): ...` runs the block with that engine, then restores the previous one."""
    previous = get_engine()
    set_engine(name)
    try:
        yield
    finally:
        set_engine(previous)


def enabled() -> bool:
    """Whether the layers run this package's code (every engine but the textbook "im2col")."""
    return _state["engine"] != "im2col"


def conv2d_path(x, w) -> str:
    """The code that convolves x (N, H, W, C) with w (k, k, C, F) under the current engine."""
    engine = _state["engine"]
    k, _, C, F = w.shape
    H, W = x.shape[1], x.shape[2]
    if engine == "im2col":
        return "im2col"
    if engine == "gemm" or not winograd.applies(k, H, W):
        return "gemm"
    if engine == "winograd":
        return "winograd"
    if min(C, F) < WINOGRAD_MIN_CHANNELS or not isinstance(x, np.ndarray) or not parallel.blas_single_threaded():
        return "gemm"
    # F(4x4, 3x3) measured fastest forward + backward on every 3x3 conv of both networks, 1.0-1.6x
    # F(2x2, 3x3) (64 -> 128 at 64x64 batch 16: 134 vs 211 ms), thin outputs included (128 -> 32:
    # 54 ms, as multiply-then-shift). On sizes that do not divide by 4, gemm.py multiplies first
    # for few outputs (4F <= C): faster there both ways than F(2x2, 3x3).
    if winograd4.applies(k, H, W):
        return "winograd4"
    return "gemm" if gemm.multiplies_first(C, F, k) else "winograd"


def conv2d_forward(x, w, b, path: str, relu: bool = False, inference: bool = False) -> tuple:
    """'same' convolution by `path` ("gemm", "winograd" or "winograd4"): (out (N, H, W, F), cache);
    with `relu`, max(out, 0) computed in the GEMMs' epilogue. With `inference` no backward will
    read the cache, so it keeps only what it costs nothing to keep (Winograd F(4x4) keeps its
    transformed input for a backward otherwise)."""
    if path == "winograd":
        return winograd.forward(x, w, b, relu)
    if path == "winograd4":
        return winograd4.forward(x, w, b, relu, keep_v=not inference)
    if path == "gemm":
        return gemm.forward(x, w, b, relu)
    raise ValueError(f"the fast engine has no conv path {path!r}")


def maxpool_relu_backward(pool, relu, dout):
    """The backward of a ReLU then MaxPool2d (pool after relu, both run by this engine) as one
    pass over the big map: dout (N, H//2, W//2, C) -> the ReLU's dx (N, H, W, C); None when
    the pool did not read that ReLU's output (the caller runs the two backward passes)."""
    from ..layers import ReLU

    relu_cache, pool_cache = getattr(relu, "cache", None), getattr(pool, "cache", None)
    if type(relu) is not ReLU or not isinstance(relu_cache, tuple) or relu_cache[0] != "fast" or \
            not isinstance(pool_cache, tuple) or pool_cache[0] != "fast" or pool_cache[1] is not relu_cache[1]:
        return None
    return maxpool2d_backward(dout, pool_cache, relu=True)


def maxpool_backward_plus(pool, dout, plus):
    """The MaxPool2d's backward (run by this engine, on even sizes) plus `plus`, the gradient of
    another reader of the pool's input (N, H, W, C), in one pass; None where that does not apply
    (the caller adds them)."""
    cache = getattr(pool, "cache", None)
    if not isinstance(cache, tuple) or cache[0] != "fast" or cache[1].shape != plus.shape or \
            cache[1].shape[1] % 2 or cache[1].shape[2] % 2:
        return None
    return maxpool2d_backward(dout, cache, plus=plus)


def conv2d_backward(dout, w, cache: tuple, input_grad: bool = True) -> tuple:
    """(dx (N, H, W, C), or None without input_grad; dW (k, k, C, F); db (F,)) by the forward's path."""
    if cache[0] == "winograd":
        return winograd.backward(dout, cache, input_grad)
    if cache[0] == "winograd4":
        return winograd4.backward(dout, cache, input_grad)
    return gemm.backward(dout, cache, w, input_grad)
