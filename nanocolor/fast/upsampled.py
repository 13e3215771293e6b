"""A 3x3 convolution of a nearest-upsampled map, computed at the map's low resolution.

After a x2 nearest upsampling, pixel (2i + r, 2j + s) of the big map is pixel (i, j) of the
small one x, so the 'same' 3x3 conv's three kernel rows reach only two rows of x: for output
row phase r = 0 the kernel row 0 reads row i - 1 and rows 1 and 2 both read row i; for r = 1
rows 0 and 1 read row i and row 2 reads row i + 1. Likewise along columns. Each of the four
output phases (r, s) is thus a 2x2 conv of x with summed taps (the "sub-pixel" view of a resize
convolution), and the four share their 16 distinct (row, column) tap sums:

    combination  phase  offset  kernel taps summed
        0          0      -1      W[0]
        1          0       0      W[1] + W[2]
        2          1       0      W[0] + W[1]
        3          1      +1      W[2]

So the conv multiplies first, Y = x @ [W_c] (16 F columns, one per pair of combinations) at the
low resolution, and adds each product into its output phase shifted by its offsets: 2.25x fewer
multiplies than the conv of the upsampled map (16 taps per 4 output pixels instead of 36), no
upsampled map made or read, and backward's gradient comes out at the low resolution directly.
In the U-Net decoder the conv reads concat(upsample(x), skip): the skip's channels run through
the engine's conv as usual and this adds the upsampled channels' part into its output.

Shapes (channels-last): x (N, h, w, Cu) low resolution; w (3, 3, Cu, F); out and dout
(N, 2h, 2w, F); Y (pixels of a piece, 4, 4, F).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .helpers import CHANNELS_LAST_MIN_F, pixel_rows, relu_into, weight_grad
from .workspace import scratch

COMBINATIONS = ((0, -1), (0, 0), (1, 0), (1, 1))  # (output phase, offset of the low-res pixel read)
SUMS = np.array([[1, 0, 0],                       # SUMS[c, a]: kernel row a enters combination c
                 [0, 1, 1],
                 [1, 1, 0],
                 [0, 0, 1]], dtype=np.float64)
CENTRES = (1, 2)  # the combinations with offset 0: one per phase, reaching every output pixel


def applies(kernel: int) -> bool:
    """Whether this file covers a k x k kernel: the 3x3 ones."""
    return kernel == 3


def combined_weights(w):
    """(3, 3, C, F) -> (C, 16 F): W_c[ca, cb] = sum over a, b of SUMS[ca, a] SUMS[cb, b] W[a, b],
    as columns (ca, cb, f)."""
    xp = array_module(w)
    _, _, C, F = w.shape
    sums = xp.asarray(SUMS.astype(w.dtype))
    rows = xp.matmul(sums, w.reshape(3, 3 * C * F)).reshape(4, 3, C, F)      # along kernel rows
    both = xp.matmul(sums, rows.transpose(1, 0, 2, 3).reshape(3, 4 * C * F))  # then columns: (cb, ca, C, F)
    return xp.ascontiguousarray(both.reshape(4, 4, C, F).transpose(2, 1, 0, 3).reshape(C, 16 * F))


def combined_weights_adjoint(dw_c, F: int):
    """Adjoint of combined_weights: (C, 16 F) -> dW (3, 3, C, F)."""
    xp = array_module(dw_c)
    C = dw_c.shape[0]
    sums_t = xp.asarray(SUMS.T.astype(dw_c.dtype))                               # (3, 4)
    by_combination = dw_c.reshape(C, 4, 4, F).transpose(1, 2, 0, 3)              # (ca, cb, C, F)
    rows = xp.matmul(sums_t, by_combination.reshape(4, 4 * C * F)).reshape(3, 4, C, F)
    both = xp.matmul(sums_t, rows.transpose(1, 0, 2, 3).reshape(4, 3 * C * F))   # (b, a, C, F)
    return xp.ascontiguousarray(both.reshape(3, 3, C, F).transpose(1, 0, 2, 3))


def _span(offset: int, size: int) -> tuple:
    """(target, source) slices along one axis: out[i] gets Y[i + offset] where both exist."""
    return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size - max(0, -offset))


def add_forward(x, w, out, b=None, relu: bool = False) -> None:
    """out (N, 2h, 2w, F) += conv3x3(upsample2x(x), w) for x (N, h, w, Cu), in place; with `b`,
    out is written instead (= that conv + b); with `relu`, max(., 0) at the end of each piece."""
    xp = array_module(x)
    N, h, w_, C = x.shape
    F = w.shape[-1]
    w_c = combined_weights(w)
    phases = out.reshape(N, h, 2, w_, 2, F)  # [n, i, r, j, s] is pixel (2i + r, 2j + s)
    channels_last = F >= CHANNELS_LAST_MIN_F

    def piece(n: slice, _: slice) -> None:
        N_ = n.stop - n.start
        y = xp.matmul(x[n].reshape(-1, C), w_c, out=scratch("up_y", (N_ * h * w_, 16 * F), x.dtype, x))
        if channels_last:  # each product pixel's F values are one contiguous run
            y = y.reshape(N_, h, w_, 4, 4, F).transpose(3, 4, 0, 1, 2, 5)   # (ca, cb, N_, h, w, F) view
            acc = scratch("up_acc", (2, 2, N_, h, w_, F), x.dtype, x)      # the four phases, each contiguous
            at = lambda rows, cols: (slice(None), rows, cols)
        else:  # few outputs: channels-first, so that the shifted adds run along image rows
            y_t = scratch("up_y_t", (4, 4, F, N_, h, w_), x.dtype, x)
            xp.copyto(y_t, y.reshape(N_, h, w_, 4, 4, F).transpose(3, 4, 5, 0, 1, 2))
            y, acc = y_t, scratch("up_acc", (2, 2, F, N_, h, w_), x.dtype, x)
            at = lambda rows, cols: (slice(None), slice(None), rows, cols)
        for ca in CENTRES:  # the offset-0 combinations cover their phase: they start it
            for cb in CENTRES:
                xp.copyto(acc[COMBINATIONS[ca][0], COMBINATIONS[cb][0]], y[ca, cb])
        for ca, (r, oy) in enumerate(COMBINATIONS):
            rows_to, rows_from = _span(oy, h)
            for cb, (s, ox) in enumerate(COMBINATIONS):
                if ca in CENTRES and cb in CENTRES:
                    continue
                cols_to, cols_from = _span(ox, w_)
                acc[r, s][at(rows_to, cols_to)] += y[ca, cb][at(rows_from, cols_from)]
        if not channels_last:
            acc = acc.transpose(0, 1, 3, 4, 5, 2)
        o = phases[n].transpose(2, 4, 0, 1, 3, 5)  # (r, s, N_, h, w, F) view of the output
        if b is not None:
            xp.add(acc, b, out=o)
        else:
            o += acc
        if relu:
            relu_into(out[n], out[n])

    parallel.run_pieces(piece, parallel.pieces(N, h, w_, x, bands=False, target=_pixels_per_piece(F, x.itemsize)), x)


def _pixels_per_piece(F: int, itemsize: int) -> int:
    """Low-res pixels per piece: a product Y (16 F per pixel) of about 2 MiB."""
    return max(64, (2 << 20) // (16 * F * itemsize))


def backward(dout, x, w) -> tuple:
    """Backward of add_forward's conv: dout (N, 2h, 2w, F) -> (dx (N, h, w, Cu), dW (3, 3, Cu, F)).

    dY[i, j, ca, cb] = dout at phase (r, s) of pixel (i - oy, j - ox), for the combinations' offsets
    oy, ox (the adjoint of the shifted add; zero where that is outside), then dx = dY W_c^T and
    dW_c = x^T dY, one GEMM each per piece.
    """
    xp = array_module(dout)
    N, h, w_, C = x.shape
    F = w.shape[-1]
    w_c = combined_weights(w)
    phases = dout.reshape(N, h, 2, w_, 2, F)
    dx = xp.empty((N, h, w_, C), dtype=dout.dtype)
    dw_c = xp.zeros((parallel.slots(dout), C, 16 * F), dtype=dout.dtype)  # partial sums, one per worker

    def piece(n: slice, _: slice) -> None:
        N_ = n.stop - n.start
        d_y = scratch("up_y", (N_, h, w_, 4, 4, F), dout.dtype, dout)
        d = phases[n]
        for ca, (r, oy) in enumerate(COMBINATIONS):
            rows_to, rows_from = _span(oy, h)
            for cb, (s, ox) in enumerate(COMBINATIONS):
                cols_to, cols_from = _span(ox, w_)
                d_y[:, rows_from, cols_from, ca, cb] = d[:, rows_to, r, cols_to, s]
                if oy:  # the row of Y no output reads
                    d_y[:, 0 if oy > 0 else h - 1, :, ca, cb] = 0
                if ox:
                    d_y[:, :, 0 if ox > 0 else w_ - 1, ca, cb] = 0
        d_y = d_y.reshape(-1, 16 * F)
        dw_c[parallel.slot()] += weight_grad(x[n].reshape(-1, C), d_y)
        xp.matmul(d_y, w_c.T, out=pixel_rows(dx[n]))

    parallel.run_pieces(piece, parallel.pieces(N, h, w_, dout, bands=False, target=_pixels_per_piece(F, dout.itemsize)), dout)
    return dx, combined_weights_adjoint(dw_c.sum(axis=0), F)
