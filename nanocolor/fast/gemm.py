"""The "gemm" convolution: one GEMM per pass and piece, nothing kept from forward but x.

Compared with the textbook im2col of nanocolor/layers.py, which keeps the (P, k*k*C) patch
matrix from forward to backward, patch matrices are built piece by piece in scratch buffers and
never kept: backward builds the patch matrix of dout and gets both dx (dcols W_flipped, a
convolution with the flipped kernel) and dW (x^T dcols) from it. Thin outputs (4F <= C)
multiply first and add k*k shifted slices after, reading x once instead of k*k times.

Shapes (channels-last): x (N, H, W, C), w (k, k, C, F), b (F,), dout (N, H, W, F);
P = pixels of a piece, one patch-matrix row per pixel.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .helpers import (CHANNELS_LAST_MIN_F, add_thin_product, column_sums, pad_rows, patch_matrix_pieces, pixel_rows,
                      relu_into, weight_grad)
from .workspace import scratch


def patch_matrix(x, k: int, tag: str, rows: slice | None = None):
    """im2col of x (N, H, W, C) with 'same' zero padding -> (N*H*W, k*k*C), in a scratch buffer;
    with `rows`, only the patch-matrix rows of those image rows, (N*len(rows)*W, k*k*C).

    A 1x1 kernel needs no copy: the patch matrix is x itself.
    """
    xp = array_module(x)
    N, H, W, C = x.shape
    rows = rows if rows is not None else slice(0, H)
    if k == 1:
        return x[:, rows].reshape(-1, C)
    x_pad = pad_rows(x, rows, k // 2, "pad")
    R = rows.stop - rows.start
    sN, sH, sW, sC = x_pad.strides
    every_patch = xp.lib.stride_tricks.as_strided(x_pad, shape=(N, R, W, k, k, C), strides=(sN, sH, sW, sH, sW, sC))
    cols = scratch(tag, (N * R * W, k * k * C), x.dtype, x)
    xp.copyto(cols.reshape(N, R, W, k, k, C), every_patch)
    return cols


FEW_CHANNELS = 1  # inputs this thin (a lightness image) build their patch matrix transposed (patch_matrix_t)


def patch_matrix_t(x, k: int, tag: str, rows: slice | None = None):
    """The transpose of patch_matrix, (k*k*C, N*R*W), in a scratch buffer: for inputs with few
    channels, where patch_matrix's copy moves C values at a time (one, for a lightness image)
    and this one copies whole shifted images row by row; measured 1.5x faster for C = 1."""
    N, H, W, C = x.shape
    rows = rows if rows is not None else slice(0, H)
    R, p = rows.stop - rows.start, k // 2
    x_pad = pad_rows(x, rows, p, "pad")
    cols_t = scratch(tag, (k, k, C, N, R, W), x.dtype, x)
    for i in range(k):
        for j in range(k):
            array_module(x).copyto(cols_t[i, j], x_pad[:, i:i + R, j:j + W].transpose(3, 0, 1, 2))
    return cols_t.reshape(k * k * C, N * R * W)


def flipped_weights(w):
    """(k, k, C, F) -> (k*k*F, C): the kernel rotated by 180 degrees with C and F swapped, for dx."""
    k, _, C, F = w.shape
    return w[::-1, ::-1].transpose(0, 1, 3, 2).reshape(k * k * F, C)


def forward(x, w, b, relu: bool = False) -> tuple:
    """'same' convolution, x (N, H, W, C) -> (out (N, H, W, F), cache for `backward`); with
    `relu`, max(conv, 0) on each piece of the output while it is in cache."""
    xp = array_module(x)
    N, H, W, C = x.shape
    k, F = w.shape[0], w.shape[-1]
    cache = ("gemm", x)
    if multiplies_first(C, F, k):
        return multiply_then_shift(x, w, b, relu), cache
    w2d = w.reshape(k * k * C, F)
    out = xp.empty((N, H, W, F), dtype=x.dtype)

    def piece(n: slice, y: slice) -> None:
        o = pixel_rows(out[n, y])
        if C <= FEW_CHANNELS and k > 1:
            xp.matmul(patch_matrix_t(x[n], k, "cols", y).T, w2d, out=o)
        else:
            xp.matmul(patch_matrix(x[n], k, "cols", y), w2d, out=o)
        o += b
        if relu:
            relu_into(o, o)

    parallel.run_pieces(piece, patch_matrix_pieces(N, H, W, x, k * k * C), x)
    return out, cache


def backward(dout, cache: tuple, w, input_grad: bool = True) -> tuple:
    """dout (N, H, W, F) -> (dx (N, H, W, C) or None without input_grad, dW (k, k, C, F), db (F,))."""
    xp = array_module(dout)
    _, x = cache
    N, H, W, C = x.shape
    k, F = w.shape[0], w.shape[-1]
    work = patch_matrix_pieces(N, H, W, dout, k * k * (F if input_grad else C))  # the patch matrix of dout, or of x
    db = xp.zeros((parallel.slots(dout), F), dtype=dout.dtype)  # partial sums, one per worker
    if not input_grad:  # only dW = cols^T dout, with x's patch matrix rebuilt piece by piece
        dw = xp.zeros((parallel.slots(dout), k * k * C, F), dtype=dout.dtype)

        def weight_grad_piece(n: slice, y: slice) -> None:
            d = dout[n, y].reshape(-1, F)
            if C <= FEW_CHANNELS and k > 1:
                add_thin_product(patch_matrix_t(x[n], k, "cols", y), d, dw[parallel.slot()])
            else:
                dw[parallel.slot()] += weight_grad(patch_matrix(x[n], k, "cols", y), d)
            db[parallel.slot()] += column_sums(d)

        parallel.run_pieces(weight_grad_piece, work, dout)
        return None, dw.sum(axis=0).reshape(w.shape), db.sum(axis=0)
    # One patch matrix of dout serves both gradients (dcols[(n,y,x), (i,j,f)] = dout_pad[n, y+i, x+j, f]):
    #   dx = dcols @ W_flipped                       (a convolution with the flipped kernel)
    #   dW[i, j] = (x^T dcols)[:, (k-1-i, k-1-j, :)]   (pixel y + k-1-i of dout_pad is y - (i - k//2))
    w_flipped = flipped_weights(w)
    dx = xp.empty((N, H, W, C), dtype=dout.dtype)
    dw = xp.zeros((parallel.slots(dout), C, k * k * F), dtype=dout.dtype)

    def products(n: slice, y: slice) -> None:
        dcols = patch_matrix(dout[n], k, "cols", y)
        xp.matmul(dcols, w_flipped, out=pixel_rows(dx[n, y]))
        add_thin_product(x[n, y].reshape(-1, C).T, dcols, dw[parallel.slot()])
        db[parallel.slot()] += column_sums(dout[n, y].reshape(-1, F))

    parallel.run_pieces(products, work, dout)
    dw_flipped = dw.sum(axis=0).reshape(C, k, k, F)
    return dx, xp.ascontiguousarray(dw_flipped[:, ::-1, ::-1].transpose(1, 2, 0, 3)), db.sum(axis=0)


def multiplies_first(C: int, F: int, k: int) -> bool:
    """Whether `forward` takes multiply_then_shift for C inputs, F outputs and a k x k kernel."""
    return 4 * F <= C and k > 1


def multiply_then_shift(x, w, b, relu: bool = False, upsampled=None):
    """'same' conv for few output channels: Y = x @ [W_ij] (k*k*F columns), then out = sum of the
    k*k shifted slices of Y. Reads x once instead of copying it k*k times into a patch matrix.

    x (N, H, W, C), w (k, k, C, F), b (F,) -> (N, H, W, F); with `relu`, max(that, 0).
    With `upsampled` (N, H/2, W/2, Cu) the conv's input is concat(upsample2x(upsampled), x) along
    channels: those Cu channels' products are taken at the low resolution and added into x's
    products upsampled, as a per-pixel product commutes with nearest-neighbour upsampling (4x
    fewer multiplies there, and no upsampled or joined map is made).
    The products are channels-last (each shifted add runs over F contiguous values, written into
    the output directly) when F >= CHANNELS_LAST_MIN_F, else channels-first (the adds run along W,
    then one transposing copy): measured ~20% faster each in its range.
    """
    xp = array_module(x)
    k, C, F, p = w.shape[0], w.shape[2], w.shape[-1], w.shape[0] // 2
    N, H, W = x.shape[:3]
    Cu = 0 if upsampled is None else upsampled.shape[-1]
    channels_last = F >= CHANNELS_LAST_MIN_F
    w_taps = xp.ascontiguousarray(w.transpose(2, 0, 1, 3).reshape(C, k * k * F))  # columns (i, j, f)
    out = xp.empty((N, H, W, F), dtype=x.dtype)

    def shifted_add(acc, y_tap, i: int, j: int) -> None:
        """acc[.., y, x] += y_tap[.., y + dy, x + dx] over the pixels where both exist."""
        dy, dx = i - p, j - p  # out[y, x] += x[y + dy, x + dx] @ W[i, j]
        acc[..., max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)] += \
            y_tap[..., max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)]

    def products(n: slice):
        """Y of images n: (N_ * H * W, k*k*F) in scratch."""
        N_ = n.stop - n.start
        y = xp.matmul(x[n].reshape(-1, C - Cu), w_taps[Cu:], out=scratch("taps", (N_ * H * W, k * k * F), x.dtype, x))
        if upsampled is None:
            return y
        y_low = xp.matmul(upsampled[n].reshape(-1, Cu), w_taps[:Cu],
                          out=scratch("taps_low", (N_ * H * W // 4, k * k * F), x.dtype, x))
        blocks = y.reshape(N_, H // 2, 2, W // 2, 2, k * k * F)  # [n, y, r, x, q] is pixel (2y + r, 2x + q)
        blocks += y_low.reshape(N_, H // 2, 1, W // 2, 1, k * k * F)
        return y

    def piece(n: slice, _: slice) -> None:
        N_ = n.stop - n.start
        others = [(i, j) for i in range(k) for j in range(k) if (i, j) != (p, p)]
        if channels_last:  # Y (N_, H, W, k, k, F); acc is the output itself
            y = products(n).reshape(N_, H, W, k, k, F).transpose(3, 4, 0, 5, 1, 2)  # (k, k, N_, F, H, W) view
            acc = out[n].transpose(0, 3, 1, 2)                                       # (N_, F, H, W) view
            xp.add(y[p, p], b.reshape(F, 1, 1), out=acc)
            for i, j in others:
                shifted_add(acc, y[i, j], i, j)
            if relu:
                relu_into(out[n], out[n])
            return
        # Channels-first products (k, k, F, N_, H, W): each tap's shifted slice-add runs along W.
        # x @ W first, then one transposing copy of the thin product: a GEMM that streams x as it
        # lies, measured 1.3-1.5x faster than W @ x^T.
        y = scratch("taps_t", (k, k, F, N_, H, W), x.dtype, x)
        xp.copyto(y, products(n).reshape(N_, H, W, k, k, F).transpose(3, 4, 5, 0, 1, 2))
        acc = scratch("taps_sum", (F, N_, H, W), x.dtype, x)
        xp.add(y[p, p], b.reshape(F, 1, 1, 1), out=acc)
        for i, j in others:
            shifted_add(acc, y[i, j], i, j)
        if relu:
            relu_into(acc, acc)
        xp.copyto(out[n], acc.transpose(1, 2, 3, 0))

    parallel.run_pieces(piece, parallel.pieces(N, H, W, x, bands=False, target=_taps_pixels(k, F, x.itemsize)), x)
    return out


def _taps_pixels(k: int, F: int, itemsize: int) -> int:
    """Pixels per piece of multiply_then_shift: products Y (k*k*F per pixel) of about 1 MiB, at least
    4096 pixels. Thin outputs (the head's 2) then take several images per piece: a piece of one
    64x64 image made some 15 NumPy calls of ~50 us each, and two workers were measured slower
    than one."""
    return max(4096, (1 << 20) // (k * k * F * itemsize))
