"""Winograd F(4x4, 3x3): 4x fewer multiplies than direct convolution (F(2x2, 3x3) in
winograd.py: 2.25x), at a larger float32 rounding error; forward and backward.

Each 4x4 block ("tile") of output pixels comes from the 6x6 block of padded input around it
(Lavin & Gray, 2016):
    y_tile = A^T [ sum_c (G w_cf G^T) * (B^T x_tile,c B) ] A
with the points 0, +-1, +-2 and infinity. Per piece of the batch: the 6x6 input blocks are
gathered once, (6, 6, tiles, C); the two 1-D transforms of B^T are each one matrix multiply by
the 6x6 matrix over the flattened rest (memory-bound passes that BLAS streams); 36 GEMMs
(tiles x C) @ (C x F), one per position of the Winograd domain (one batched matmul); then A^T
the same way, and one copy into the image that adds nothing but the optional ReLU (the bias
enters at position (1, 1), which reaches every output pixel of its tile with weight 1).
`backward` runs each of these steps back through its adjoint.

Rounding: the transforms scale values by up to ~100 and add them up again, so the float32
error is some 1e-5 of the output's size (F(2x2, 3x3): ~1e-6), far below what an 8-bit color
shows or what a gradient step notices; tests/test_winograd4.py measures it against the float64
im2col reference, and checks the gradients to 1e-11 in float64.

The U-Net decoder's conv reads concat(upsample2x(x_low), skip): `forward(skip, w, b,
upsampled=x_low)` takes that joined input without making it. Each tile's 6x6 block of the
upsampled map repeats a 4x4 block of x_low (rows 2t - 1, 2t, 2t, 2t + 1, 2t + 1, 2t + 2 of it,
zero padding included, and likewise columns): B^T S x_block S^T B with the 6x4 selection S, so
those channels' V comes from x_low through the 6x4 matrix B^T S (16 values read per tile and
channel instead of 36), and their products add into the skip's in the Winograd domain: one
output transform for both. Per 4x4 output tile the upsampled channels then cost 36 multiplies
against 64 for upsampled.py's four 2x2 phases.

Shapes (channels-last): x (N, H, W, C) with H and W multiples of 4; w (3, 3, C, F);
th, tw = H // 4, W // 4 tiles; P tiles of a piece; x_low (N, H/2, W/2, Cu) and then w
(3, 3, Cu + C, F), the upsampled channels first.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .helpers import column_sums, leaky_relu_into, pad_rows, relu_into, small_matmul, transform_adjoint
from .workspace import prepared, scratch

B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)
UPSAMPLED_ROWS = np.array([[1, 0, 0, 0],  # S: the 6 rows of a tile's upsampled block, from 4 rows of x_low
                           [0, 1, 0, 0],
                           [0, 1, 0, 0],
                           [0, 0, 1, 0],
                           [0, 0, 1, 0],
                           [0, 0, 0, 1]], dtype=np.float64)
BIAS_POSITION = 1 * 6 + 1  # A^T's column 1 is all ones: (1, 1) reaches the whole tile
PIECE_BYTES = 4 << 20      # transformed input of a piece: about this much (cache, not memory)


def applies(kernel: int, H: int, W: int) -> bool:
    """F(4x4, 3x3) covers 3x3 kernels on images whose height and width are multiples of 4."""
    return kernel == 3 and H % 4 == 0 and W % 4 == 0 and H > 0 and W > 0


def _g_1d(xp, w, out) -> None:
    """out[a] = sum_i G[a, i] w[i] for 3 equally shaped views w and 6 out: the 1-D filter transform."""
    xp.multiply(w[0], 1 / 4, out=out[0])
    xp.add(w[0], w[2], out=out[5])                  # out[5] holds w0 + w2 until its final value
    xp.add(out[5], w[1], out=out[1])
    out[1] *= -1 / 6
    xp.subtract(out[5], w[1], out=out[2])
    out[2] *= -1 / 6
    xp.multiply(w[2], 1 / 6, out=out[4])
    xp.multiply(w[0], 1 / 24, out=out[3])
    out[3] += out[4]                                # out[3] holds s = w0 / 24 + w2 / 6
    xp.multiply(w[1], 1 / 12, out=out[4])
    xp.subtract(out[3], out[4], out=out[4])         # s - w1 / 12
    out[3] *= 2
    out[3] -= out[4]                                # s + w1 / 12
    xp.copyto(out[5], w[2])


def filter_transform(w):
    """(3, 3, C, F) -> U = G w G^T at every (c, f): (36, C, F). Tens of MB for the widest layers,
    made at every forward: adds on strided views, split over the CPU workers by input channel
    (measured 6x faster than two float64 matrix multiplies)."""
    xp = array_module(w)
    _, _, C, F = w.shape
    rows = xp.empty((6, 3, C, F), dtype=w.dtype)
    U = xp.empty((6, 6, C, F), dtype=w.dtype)

    def part(c: slice, _: slice) -> None:
        _g_1d(xp, w[:, :, c], rows[:, :, c])                                 # G along the kernel's rows
        _g_1d(xp, [rows[:, j, c] for j in range(3)], [U[:, b, c] for b in range(6)])  # then its columns

    parts = parallel.slots(w) if C * F >= 1 << 15 else 1  # small filters: fewer calls on one thread
    parallel.run_pieces(part, [(slice(a, b), None) for a, b in parallel.split(C, parts)], w)
    return U.reshape(36, C, F)


def _input_transform(x, n: slice, t: slice, m_t, out=None):
    """V = M^T x_block M for tile rows t of images n of x (N, H, W, C) padded by one zero pixel:
    (36, P, C), in `out` ((6, 6, P, C)) when given, else in scratch. M^T = m_t is B^T (6x6): the
    6x6 blocks of x at stride 4; or B^T S (6x4) for the upsampled map of x, read as the 4x4
    blocks of x at stride 2 (see the module docstring)."""
    xp = array_module(x)
    size = m_t.shape[1]
    stride, low = size - 2, size == 4  # neighbouring blocks overlap by 2: the 3x3 kernel's reach
    C, tw = x.shape[3], x.shape[2] // stride
    N_, T_ = n.stop - n.start, t.stop - t.start
    P = N_ * T_ * tw
    tag = "_low" if low else ""  # both kinds run in one piece: their own buffers
    x_pad = pad_rows(x[n], slice(stride * t.start, stride * t.stop), 1, "pad" + tag)
    sN, sH, sW, sC = x_pad.strides
    blocks = xp.lib.stride_tricks.as_strided(x_pad, shape=(size, size, N_, T_, tw, C),
                                             strides=(sH, sW, sN, stride * sH, stride * sW, sC))
    d = scratch(f"w4{tag}_d", (size, size, N_, T_, tw, C), x.dtype, x)
    xp.copyto(d, blocks)                                   # d[i, j, tile, c] = x_block[i, j, c]
    e = scratch(f"w4{tag}_e", (6, size * P * C), x.dtype, x)
    small_matmul(m_t, d.reshape(size, -1), e)              # M^T along the block's rows
    if out is None:  # d is spent: V goes there when it fits
        out = scratch("w4_low_v", (6, 6, P * C), x.dtype, x) if low else d
    v = out.reshape(6, 6, P * C)
    small_matmul(m_t, e.reshape(6, size, P * C), v)        # then along its columns
    return v.reshape(36, P, C)


def _tile_range(n: slice, t: slice, th: int, tw: int) -> slice:
    """The tiles of a piece (images n, tile rows t) in tile order (image, row, column): one
    contiguous range, as every piece is whole images or a band of one image."""
    start, stop = (n.start * th + t.start) * tw, ((n.stop - 1) * th + t.stop) * tw
    assert stop - start == (n.stop - n.start) * (t.stop - t.start) * tw, "a piece must be contiguous tiles"
    return slice(start, stop)


def _matrices(dtype, like) -> tuple:
    """(B^T, A^T) in `dtype`, on the array module of `like`."""
    xp = array_module(like)
    return xp.asarray(B_T.astype(dtype)), xp.asarray(A_T.astype(dtype))


def _tiles_per_piece(C: int, F: int, itemsize: int) -> int:
    """Tiles per piece of work: transformed arrays of about PIECE_BYTES."""
    return max(16, PIECE_BYTES // (36 * max(C, F) * itemsize))


def _bs_t(dtype, like):
    """B^T S (6, 4) in `dtype`: the input transform of an upsampled block, from x_low's 4x4 block."""
    return array_module(like).asarray((B_T @ UPSAMPLED_ROWS).astype(dtype))


def forward(x, w, b, relu: bool = False, keep_v: bool = False, upsampled=None, slope: float | None = None) -> tuple:
    """'same' 3x3 convolution -> (out (N, H, W, F), cache for `backward`); with `relu`, max(out, 0),
    with `slope` the LeakyReLU max(out, slope * out).
    With `keep_v` the cache keeps the transformed input V (2.25x the size of x) instead of x,
    which backward would otherwise transform again; without it (inference) V stays in scratch.
    With `upsampled` x_low (N, H/2, W/2, Cu), the conv of concat(upsample2x(x_low), x) by w
    (3, 3, Cu + C, F), made from x_low directly (see the module docstring); the cache is then
    that of x's channels alone (their conv by w[:, :, Cu:]): backward gives their gradients, and
    upsampled.backward x_low's (measured faster than this file's adjoint for x_low, whose 36
    GEMMs have only F terms each: 21 against 19 ms for 64 + 64 -> 32 channels at 32x32 batch 32)."""
    xp = array_module(x)
    N, H, W, C = x.shape
    Cu = 0 if upsampled is None else upsampled.shape[-1]
    if keep_v or not isinstance(w, np.ndarray):
        U = filter_transform(w)
    else:  # inference: the same weights again and again, transformed once
        U = prepared("winograd4", (w,), filter_transform)
    F = U.shape[-1]
    th, tw = H // 4, W // 4
    b_t, a_t = _matrices(x.dtype, x)
    bs_t = _bs_t(x.dtype, x) if Cu else None
    out = xp.empty((N, H, W, F), dtype=x.dtype)
    V = xp.empty((6, 6, N * th * tw, C), dtype=x.dtype) if keep_v else None

    def piece(n: slice, t: slice) -> None:
        N_, T_ = n.stop - n.start, t.stop - t.start
        P = N_ * T_ * tw
        v = _input_transform(x, n, t, b_t, None if V is None else V[:, :, _tile_range(n, t, th, tw)])
        m = xp.matmul(v, U[:, Cu:], out=scratch("w4_m", (36, P, F), x.dtype, x))  # 36 GEMMs, one call
        if Cu:  # the upsampled channels' products, added in the Winograd domain
            v_low = _input_transform(upsampled, n, t, bs_t)
            m += xp.matmul(v_low, U[:, :Cu], out=scratch("w4_low_m", (36, P, F), x.dtype, x))
        m[BIAS_POSITION] += b
        s = scratch("w4_s", (4, 6 * P * F), x.dtype, x)
        small_matmul(a_t, m.reshape(6, -1), s)                 # A^T along the rows
        y = scratch("w4_y", (4, 4, P * F), x.dtype, x)
        small_matmul(a_t, s.reshape(4, 6, P * F), y)           # then along the columns
        if relu:  # on the contiguous tiles, before they are scattered (much faster than on the way)
            relu_into(y, y)
        elif slope is not None:
            leaky_relu_into(y, slope)
        tiles = y.reshape(4, 4, N_, T_, tw, F).transpose(2, 3, 0, 4, 1, 5)
        xp.copyto(out[n, 4 * t.start:4 * t.stop].reshape(N_, T_, 4, tw, 4, F), tiles)

    work = parallel.pieces(N, th, tw, x, target=_tiles_per_piece(C + Cu, F, x.itemsize))
    parallel.run_pieces(piece, work, x)
    return out, ("winograd4", x.shape, U[:, Cu:], x if V is None else None, V)


def backward(dout, cache: tuple, input_grad: bool = True) -> tuple:
    """Backward of `forward`, cache ("winograd4", x.shape, U, x or None, V or None): dout
    (N, H, W, F) -> (dx (N, H, W, C) or None without input_grad, dW (3, 3, C, F), db (F,)).

    Every step of forward run back through its adjoint, per piece of whole images: the output
    transform's (dM = A dy A^T, two multiplies by A), the 36 GEMMs' (dU = V^T dM with the V that
    forward kept, or else computed again from x; dV = dM U^T), the input transform's (B dV B^T
    per 6x6 block), and the gathering of overlapping blocks (each block added back where it came
    from: neighbouring blocks share two rows or columns; rows first, then columns), cropped to
    the image.
    """
    xp = array_module(dout)
    _, (N, H, W, C), U, x, V = cache
    F, th, tw = U.shape[-1], H // 4, W // 4
    b_t, a_t = _matrices(dout.dtype, dout)
    dU = xp.zeros((parallel.slots(dout), 36, C, F), dtype=dout.dtype)  # partial sums, one per worker
    db = xp.zeros((parallel.slots(dout), F), dtype=dout.dtype)
    dx = xp.empty((N, H, W, C), dtype=dout.dtype) if input_grad else None

    def piece(n: slice, _: slice) -> None:
        N_ = n.stop - n.start
        P = N_ * th * tw
        if V is None:
            v = _input_transform(x, n, slice(0, th), b_t)
        else:
            v = V[:, :, _tile_range(n, slice(0, th), th, tw)].reshape(36, P, C)
        dy = scratch("w4_y", (4, 4, N_, th, tw, F), dout.dtype, dout)
        xp.copyto(dy, dout[n].reshape(N_, th, 4, tw, 4, F).transpose(2, 4, 0, 1, 3, 5))
        ds = scratch("w4_s", (4, 6, P * F), dout.dtype, dout)
        small_matmul(a_t.T, dy.reshape(4, 4, P * F), ds)      # adjoint of A^T along the columns
        dm = scratch("w4_m", (6, 6 * P * F), dout.dtype, dout)
        small_matmul(a_t.T, ds.reshape(4, 6 * P * F), dm)     # then along the rows
        dm = dm.reshape(36, P, F)
        i = parallel.slot()
        db[i] += column_sums(dm[BIAS_POSITION])
        dU[i] += xp.matmul(v.transpose(0, 2, 1), dm, out=scratch("w4_dU", (36, C, F), dout.dtype, dout))
        if dx is None:
            return
        dv = scratch("w4_d", (36, P, C), dout.dtype, dout)
        xp.matmul(dm, U.transpose(0, 2, 1), out=dv)          # dV = dM U^T (a computed v is spent)
        de = scratch("w4_e", (6, 6, P * C), dout.dtype, dout)
        small_matmul(b_t.T, dv.reshape(6, 6, P * C), de)      # adjoint of B^T along the columns
        dd = dv.reshape(6, 6 * P * C)
        small_matmul(b_t.T, de.reshape(6, 6 * P * C), dd)     # then along the rows
        blocks = dd.reshape(6, 6, N_, th, tw, C)  # block row a, column b of tile (t, u) is padded pixel (4t + a, 4u + b)
        # Rows first: rows[n, t, r, b, u] is padded row 4t + r; block rows 4 and 5 of tile t are
        # rows 0 and 1 of tile t + 1 (the overlap of neighbouring blocks).
        rows = scratch("w4_rows", (N_, th + 1, 4, 6, tw, C), dout.dtype, dout)
        rows[:, th] = 0
        for a in range(4):
            xp.copyto(rows[:, :th, a], blocks[a].transpose(1, 2, 0, 3, 4))
        for a in (4, 5):
            rows[:, 1:, a - 4] += blocks[a].transpose(1, 2, 0, 3, 4)
        # then columns the same way, into the padded image (N_, 4 th + 4, 4 tw + 4, C)
        padded = scratch("pad", (N_, th + 1, 4, tw + 1, 4, C), dout.dtype, dout)
        padded[:, :, :, tw] = 0
        for b_ in range(4):
            xp.copyto(padded[:, :, :, :tw, b_], rows[:, :, :, b_])
        for b_ in (4, 5):
            padded[:, :, :, 1:, b_ - 4] += rows[:, :, :, b_]
        xp.copyto(dx[n], padded.reshape(N_, 4 * th + 4, 4 * tw + 4, C)[:, 1:H + 1, 1:W + 1])

    tiles = _tiles_per_piece(C, F, dout.itemsize)
    parallel.run_pieces(piece, parallel.pieces(N, th, tw, dout, bands=False, target=tiles), dout)
    return dx, filter_transform_adjoint(dU), db.sum(axis=0)


def filter_transform_adjoint(dU):
    """Adjoint of filter_transform: (36, C, F), or partial sums of it (S, 36, C, F), -> dw (3, 3, C, F)."""
    return transform_adjoint(dU, G)
