"""Max-pool, upsample and the ReLU's and LeakyReLU's backward split over the CPU workers:
memory-bound work that one core cannot keep up with, into preallocated outputs, through
strided views.

The same numbers as the textbook layers in nanocolor/layers.py (max-pool routes each gradient to
the first maximum of its window in the order (0,0), (0,1), (1,0), (1,1), as an argmax does).
The max-pool's forward returns (out, cache) and its backward takes that cache.
"""
from __future__ import annotations

from ..backend import array_module
from .parallel import map_elementwise, map_rows
from .workspace import scratch


def maxpool2d_forward(x) -> tuple:
    """2x2 max-pool, stride 2: x (N, H, W, C) -> (N, H//2, W//2, C); an odd last row/column is dropped."""
    xp = array_module(x)
    N, H, W, C = x.shape
    H2, W2 = H // 2, W // 2
    out = xp.empty((N, H2, W2, C), dtype=x.dtype)

    def piece(n: slice, y: slice) -> None:  # y: output rows
        rows = x[n, 2 * y.start:2 * y.stop]
        pairs = xp.maximum(rows[:, 0::2], rows[:, 1::2])  # max over each row pair, then column pair
        xp.maximum(pairs[:, :, 0:2 * W2:2], pairs[:, :, 1:2 * W2:2], out=out[n, y])

    map_rows(piece, N, H2, W, x)
    return out, (x, out)


def maxpool2d_backward(dout, cache: tuple, relu: bool = False, plus=None):
    """dout (N, H//2, W//2, C) -> dx (N, H, W, C). With `relu`, x was a ReLU's output and dx is
    also that ReLU's backward: a window whose max is 0 passes nothing (its first maximum, where
    the gradient would go, is a 0 the ReLU masks), so the mask is taken at the pooled size.
    With `plus` (N, H, W, C), H and W even, dx + plus: the gradient of another reader of x
    added in the same pass (the U-Net's skip)."""
    xp = array_module(dout)
    x, out = cache
    N, H, W, C = x.shape
    H2, W2 = out.shape[1:3]
    if plus is not None and (H % 2 or W % 2):
        raise ValueError("maxpool2d_backward adds `plus` on even sizes only")
    dx = (xp.zeros if (H % 2 or W % 2) else xp.empty)(x.shape, dtype=dout.dtype)

    # Route each gradient to the first maximum of its window (order (0,0), (0,1), (1,0), (1,1)),
    # as an argmax would: a tied window passes its gradient to one element, not to all.
    def piece(n: slice, y: slice) -> None:
        rows = slice(2 * y.start, 2 * y.stop)
        window_max, d = out[n, y], dout[n, y]
        if relu:
            d = d * (window_max > 0)
        taken = hit = None
        for i, j in [(0, 0), (0, 1), (1, 0)]:
            is_max = xp.equal(x[n, rows][:, i::2, j:2 * W2:2], window_max, out=hit)
            if taken is None:
                taken, hit = is_max, xp.empty_like(is_max)
            else:
                xp.greater(is_max, taken, out=is_max)  # a max here and none before: is_max & ~taken
                taken |= is_max
            xp.multiply(d, is_max, out=dx[n, rows][:, i::2, j:2 * W2:2])
        xp.logical_not(taken, out=taken)  # no earlier corner held the max: the last one does
        xp.multiply(d, taken, out=dx[n, rows][:, 1::2, 1:2 * W2:2])
        if plus is not None:
            dx[n, rows] += plus[n, rows]

    map_rows(piece, N, H2, W, dout)
    return dx


def upsample2d_forward(x):
    """x2 nearest-neighbour upsampling: x (N, H, W, C) -> (N, 2H, 2W, C)."""
    xp = array_module(x)
    N, H, W, C = x.shape
    out = xp.empty((N, 2 * H, 2 * W, C), dtype=x.dtype)

    def piece(n: slice, y: slice) -> None:
        xp.copyto(out[n, 2 * y.start:2 * y.stop].reshape(n.stop - n.start, y.stop - y.start, 2, W, 2, C),
                  x[n, y, None, :, None, :])

    map_rows(piece, N, H, 4 * W, x)
    return out


def upsample2d_backward(dout):
    """dout (N, 2H, 2W, C) -> dx (N, H, W, C): each pixel gets the sum of its 2x2 copies' gradients."""
    xp = array_module(dout)
    N, H2, W2, C = dout.shape
    dx = xp.empty((N, H2 // 2, W2 // 2, C), dtype=dout.dtype)

    def piece(n: slice, y: slice) -> None:  # y: rows of dx
        d = dout[n, 2 * y.start:2 * y.stop]
        pairs = xp.add(d[:, 0::2], d[:, 1::2])  # sum each row pair, then each column pair
        xp.add(pairs[:, :, 0::2], pairs[:, :, 1::2], out=dx[n, y])

    map_rows(piece, N, H2 // 2, 4 * W2, dout)
    return dx


def relu_backward(dout, out):
    """dout -> dout where the ReLU's output `out` was positive, 0 elsewhere; split over the CPU workers."""
    xp = array_module(dout)
    dx = xp.empty_like(dout)
    map_elementwise(lambda part: xp.multiply(dout[part], out[part] > 0, out=dx[part]), dout)
    return dx


def leaky_relu_backward(dout, out, slope: float):
    """dout -> dout where the LeakyReLU's output `out` was positive, slope * dout elsewhere: as
    dout * (slope + (1 - slope) * [out > 0]), four fast passes (np.where and a masked copy
    measured 4x slower)."""
    xp = array_module(dout)
    dx = xp.empty_like(dout)

    def part(index) -> None:
        factor = dx[index]
        positive = xp.greater(out[index], 0, out=scratch("leaky_mask", factor.shape, bool, dout))
        xp.multiply(positive, 1 - slope, out=factor, dtype=factor.dtype)
        factor += slope
        factor *= dout[index]

    map_elementwise(part, dout)
    return dx
