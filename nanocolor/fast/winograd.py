"""Winograd F(2x2, 3x3) convolution: 2.25x fewer multiplies than im2col for 3x3 'same' convs.

Each 2x2 block ("tile") of output pixels is computed from the 4x4 block of padded input around
it (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
    y_tile = A^T [ sum_c (G w_cf G^T) * (B^T x_tile,c B) ] A
The elementwise product summed over channels is, at each of the 16 positions of the 4x4
Winograd domain, one matrix multiply (tiles x C) @ (C x F): 16 GEMMs of 4 * 4 / 4 = 4 multiplies
per output pixel and channel pair, against im2col's 9. The transforms are cheap adds on
strided views (no loop over tiles or pixels, only over the 4x4 positions).

Shapes (channels-last): x (N, H, W, C) with H and W even; w (3, 3, C, F);
th, tw = H // 2, W // 2 tiles; P = N * th * tw. Transformed arrays have the position first,
(16, P, C) or (16, P, F), so each position is one contiguous matrix for the GEMM; position
a * 4 + b is row a, column b of the 4x4 domain.

`forward` and `backward` at the end run the whole convolution: each piece of the batch runs the
pipeline (transform, 16 GEMMs, transform) in its worker's scratch, so the transformed arrays
stay small and nothing but x and U is kept: backward transforms its input again rather than
holding 4x the input from forward.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .helpers import column_sums, relu_into, transform_adjoint
from .workspace import scratch

# F(2x2, 3x3) matrices: input transform B^T (4x4), filter transform G (4x3), output transform A^T (2x4).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def applies(kernel: int, H: int, W: int) -> bool:
    """F(2x2, 3x3) covers 3x3 kernels on images whose height and width are even."""
    return kernel == 3 and H % 2 == 0 and W % 2 == 0 and H > 0 and W > 0


def _alloc(out, shape: tuple, like):
    if out is None:
        return array_module(like).empty(shape, dtype=like.dtype)
    if out.shape != tuple(shape):
        raise ValueError(f"buffer has shape {out.shape}, need {tuple(shape)}")
    return out


def _view(a, shape: tuple):
    """a.reshape(shape), refusing a copy: results are written through these views."""
    v = a.reshape(shape)
    if v.size and not array_module(a).may_share_memory(v, a):
        raise ValueError("output buffer cannot be viewed in the needed shape without a copy")
    return v


def _bt_1d(xp, d, v) -> None:
    """v[a] = sum_i B^T[a, i] d[i] for four equally shaped views: the 1-D input transform."""
    xp.subtract(d[0], d[2], out=v[0])
    xp.add(d[1], d[2], out=v[1])
    xp.subtract(d[2], d[1], out=v[2])
    xp.subtract(d[1], d[3], out=v[3])


def _g_1d(xp, w, out) -> None:
    """out[a] = sum_i G[a, i] w[i] for three equally shaped views: the 1-D filter transform."""
    xp.copyto(out[0], w[0])
    xp.add(w[0], w[2], out=out[3])          # out[3] holds w0 + w2 until its final value
    xp.add(out[3], w[1], out=out[1])
    out[1] *= 0.5
    xp.subtract(out[3], w[1], out=out[2])
    out[2] *= 0.5
    xp.copyto(out[3], w[2])


def filter_transform(w):
    """(3, 3, C, F) weights -> U = G w G^T at every (c, f): (16, C, F)."""
    xp = array_module(w)
    _, _, C, F = w.shape
    rows = xp.empty((4, 3, C, F), dtype=w.dtype)
    _g_1d(xp, w, rows)                        # G along the kernel's rows
    out = xp.empty((4, 4, C, F), dtype=w.dtype)
    for a in range(4):                        # then along its columns
        _g_1d(xp, rows[a], out[a])
    return out.reshape(16, C, F)


def filter_transform_adjoint(dU):
    """Adjoint of filter_transform: (16, C, F) -> dw = G^T dU G, (3, 3, C, F)."""
    return transform_adjoint(dU, G)


def pad_and_split(x, rows: slice | None = None, out=None):
    """Zero-pad x (N, H, W, C), W even, by one pixel and split the padded columns by parity:
    (N, R + 2, 2, W//2 + 1, C), where [:, r, q, u] is padded pixel (r, 2u + q).

    With `rows`, only image rows rows.start-1 .. rows.stop (zeros beyond the image): the tiles
    of a band of R = len(rows) rows. Done in the padding copy, the split turns the width-wise
    transform's stride-2 reads (runs of C values) into contiguous ones.
    """
    xp = array_module(x)
    N, H, W, C = x.shape
    y0, y1 = (rows.start, rows.stop) if rows is not None else (0, H)
    tw = W // 2
    out = _alloc(out, (N, y1 - y0 + 2, 2, tw + 1, C), x)
    lo, hi = max(0, y0 - 1), min(H, y1 + 1)  # the image rows that exist
    top = lo - (y0 - 1)
    out[:, :top] = 0
    out[:, top + hi - lo:] = 0
    body = out[:, top:top + hi - lo]
    body[:, :, 0, 0] = 0                        # padded column 0
    body[:, :, 1, tw] = 0                       # padded column W + 1
    xp.copyto(body[:, :, 0, 1:], x[:, lo:hi, 1::2])   # padded column 2u = image column 2u - 1
    xp.copyto(body[:, :, 1, :tw], x[:, lo:hi, 0::2])  # padded column 2u + 1 = image column 2u
    return out


def input_transform(x_split, out=None, work=None):
    """(N, 2th+2, 2, tw+1, C) padded input from pad_and_split -> V = B^T x_tile B for every
    tile, (16, P, C).

    `out` (16, P, C) and `work` (4, N, 2th+2, tw, C) are optional buffers to write into.
    """
    xp = array_module(x_split)
    N, Hp, _, tw1, C = x_split.shape
    th, tw = (Hp - 2) // 2, tw1 - 1
    out = _alloc(out, (16, N * th * tw, C), x_split)
    cols = _alloc(work, (4, N, Hp, tw, C), x_split)
    # Along the width first: column j of tile u is padded column 2u + j.
    _bt_1d(xp, [x_split[:, :, j % 2, j // 2:j // 2 + tw] for j in range(4)], cols)
    v = _view(out, (4, 4, N, th, tw, C))
    for b in range(4):  # then along the height, in runs of whole tile rows, into position (a, b)
        _bt_1d(xp, [cols[b][:, i:i + 2 * th:2] for i in range(4)], v[:, b])
    return out


def output_transform(M, tiles: tuple, out=None, work=None, relu: bool = False):
    """(16, P, F) Winograd-domain products -> y = A^T M A assembled into (N, 2 th, 2 tw, F).

    tiles = (N, th, tw). `work` (2, 4, P, F) is an optional buffer. With `relu`, max(y, 0).
    """
    xp = array_module(M)
    N, th, tw = tiles
    F = M.shape[-1]
    out = _alloc(out, (N, 2 * th, 2 * tw, F), M)
    s = _alloc(work, (2, 4, M.shape[1], F), M)
    m = M.reshape(4, 4, -1, F)
    for b in range(4):  # A^T along the rows of the 4x4 domain
        xp.add(m[0, b], m[1, b], out=s[0, b])
        s[0, b] += m[2, b]
        xp.subtract(m[1, b], m[2, b], out=s[1, b])
        s[1, b] -= m[3, b]
    y = _view(out, (N, th, 2, tw, 2, F))  # y[:, :, r, :, q] is output pixel (2t + r, 2u + q)
    for r in range(2):  # then along the columns, in place in s (contiguous), one strided copy each
        sr = s[r].reshape(4, N, th, tw, F)
        sr[0] += sr[1]
        sr[0] += sr[2]
        xp.subtract(sr[1], sr[3], out=sr[3])
        sr[3] -= sr[2]
        if relu:  # on the contiguous sums, before the strided copy (much faster than in it)
            relu_into(sr[0], sr[0])
            relu_into(sr[3], sr[3])
        xp.copyto(y[:, :, r, :, 0], sr[0])
        xp.copyto(y[:, :, r, :, 1], sr[3])
    return out


def output_transform_adjoint(dy, out=None, work=None):
    """Adjoint of output_transform: (N, H, W, F) -> dM = A dy_tile A^T, (16, P, F).

    `work` (4, 2, N, H//2, W//2, F) is an optional buffer.
    """
    xp = array_module(dy)
    N, H, W, F = dy.shape
    th, tw = H // 2, W // 2
    out = _alloc(out, (16, N * th * tw, F), dy)
    work = _alloc(work, (4, 2, N, th, tw, F), dy)
    z, corners = work[:2], work[2:]
    d = dy.reshape(N, th, 2, tw, 2, F)
    for r in range(2):  # pixel (r, q) of every tile, (N, th, tw, F), copied out of the strided image once
        for q in range(2):
            xp.copyto(corners[r, q], d[:, :, r, :, q])
    corner = lambda r, q: corners[r, q]
    # A = A_T^T maps 2 -> 4: (d0, d1) -> (d0, d0 + d1, d0 - d1, -d1); first along the rows.
    for q in range(2):
        xp.add(corner(0, q), corner(1, q), out=z[0, q])
        xp.subtract(corner(0, q), corner(1, q), out=z[1, q])
    # Row a of the domain as (value at q=0, value at q=1, sign): row 3 is -d1, kept as a sign.
    rows = [(corner(0, 0), corner(0, 1), 1), (z[0, 0], z[0, 1], 1), (z[1, 0], z[1, 1], 1),
            (corner(1, 0), corner(1, 1), -1)]
    dm = _view(out, (4, 4, N, th, tw, F))
    for a, (d0, d1, sign) in enumerate(rows):  # then along the columns, into position (a, b)
        if sign > 0:
            xp.copyto(dm[a, 0], d0)
            xp.add(d0, d1, out=dm[a, 1])
            xp.subtract(d0, d1, out=dm[a, 2])
            xp.negative(d1, out=dm[a, 3])
        else:
            xp.negative(d0, out=dm[a, 0])
            xp.negative(d0, out=dm[a, 1])
            dm[a, 1] -= d1
            xp.subtract(d1, d0, out=dm[a, 2])
            xp.copyto(dm[a, 3], d1)
    return out


def _bt_adjoint_1d(xp, dv, out_even, out_odd, axis: int) -> None:
    """Adjoint of the 1-D input transform along tile `axis`, cropped to the unpadded image.

    Tiles overlap by two pixels, so image pixel 2t gets tile t's rows 1, 2, 3 and tile t-1's
    row 3; pixel 2t + 1 gets tile t's rows 0, 1, 2 and tile t+1's row 0:
        out_even[t] = dv1[t] - dv2[t] + dv3[t] - dv3[t-1]
        out_odd[t]  = dv1[t] + dv2[t] - dv0[t] + dv0[t+1]
    """
    def along(arr, lo=None, hi=None):  # arr sliced lo:hi along the tile axis
        index = [slice(None)] * arr.ndim
        index[axis] = slice(lo, hi)
        return arr[tuple(index)]

    xp.subtract(dv[1], dv[2], out=out_even)
    out_even += dv[3]
    along(out_even, 1)[...] -= along(dv[3], None, -1)
    xp.add(dv[1], dv[2], out=out_odd)
    out_odd -= dv[0]
    along(out_odd, None, -1)[...] += along(dv[0], 1)


def input_transform_adjoint(dV, tiles: tuple, out=None, work=None):
    """Adjoint of input_transform, cropped: (16, P, C) -> dx (N, 2 th, 2 tw, C).

    dx[pixel] = sum over the tiles covering it of (B dV B^T)[pixel]; tiles = (N, th, tw).
    `work` (2, 6, N, th, tw, C) is an optional buffer.
    """
    xp = array_module(dV)
    N, th, tw = tiles
    C = dV.shape[-1]
    out = _alloc(out, (N, 2 * th, 2 * tw, C), dV)
    rows = _alloc(work, (2, 6, N, th, tw, C), dV)
    dv = dV.reshape(4, 4, N, th, tw, C)
    for b in range(4):  # along the rows of the domain: tile axis 1 (th)
        _bt_adjoint_1d(xp, [dv[a, b] for a in range(4)], rows[0, b], rows[1, b], axis=1)
    dx = _view(out, (N, th, 2, tw, 2, C))
    for r in range(2):  # then along the columns: tile axis 2 (tw), contiguous, then one strided copy
        _bt_adjoint_1d(xp, rows[r, :4], rows[r, 4], rows[r, 5], axis=2)
        xp.copyto(dx[:, :, r, :, 0], rows[r, 4])  # pixel (2t + r, 2u)
        xp.copyto(dx[:, :, r, :, 1], rows[r, 5])  # pixel (2t + r, 2u + 1)
    return out


# ---------------------------------------------------------------------------------------------
# The convolution: x (N, H, W, C), w (3, 3, C, F), b (F,) -> out (N, H, W, F), H and W even.

def _transformed_input(x, n: slice, t: slice):
    """V = B^T x_tile B of tile rows t of images n: (16, tiles, C), in scratch."""
    W, C = x.shape[2], x.shape[3]
    N_, T_, tw = n.stop - n.start, t.stop - t.start, W // 2
    x_split = pad_and_split(x[n], slice(2 * t.start, 2 * t.stop),
                            out=scratch("pad", (N_, 2 * T_ + 2, 2, tw + 1, C), x.dtype, x))
    return input_transform(x_split, out=scratch("wino_V", (16, N_ * T_ * tw, C), x.dtype, x),
                           work=scratch("wino_work", (4, N_, 2 * T_ + 2, tw, C), x.dtype, x))


def forward(x, w, b, relu: bool = False) -> tuple:
    """'same' 3x3 convolution -> (out (N, H, W, F), cache for `backward`); with `relu`, max(out, 0)."""
    xp = array_module(x)
    N, H, W, C = x.shape
    F, tw = w.shape[-1], W // 2
    U = filter_transform(w)
    out = xp.empty((N, H, W, F), dtype=x.dtype)

    def piece(n: slice, t: slice) -> None:
        V = _transformed_input(x, n, t)
        M = scratch("wino_M", (16, V.shape[1], F), x.dtype, x)
        for q in range(16):
            xp.matmul(V[q], U[q], out=M[q])
        M[5] += b  # position (1, 1) reaches all four pixels of a tile with weight 1
        tiles = (n.stop - n.start, t.stop - t.start, tw)
        output_transform(M, tiles, out=out[n, 2 * t.start:2 * t.stop],
                         work=scratch("wino_work", (2, 4) + M.shape[1:], x.dtype, x), relu=relu)

    parallel.run_pieces(piece, parallel.pieces(N, H // 2, tw, x), x)
    return out, ("winograd", x, U)


def backward(dout, cache: tuple, input_grad: bool = True) -> tuple:
    """dout (N, H, W, F) -> (dx (N, H, W, C) or None without input_grad, dW (3, 3, C, F), db (F,))."""
    xp = array_module(dout)
    _, x, U = cache
    N, H, W, C = x.shape
    F, th, tw = U.shape[-1], H // 2, W // 2
    dU = xp.zeros((parallel.slots(dout), 16, C, F), dtype=dout.dtype)  # partial sums, one per worker
    db = xp.zeros((parallel.slots(dout), F), dtype=dout.dtype)
    dx = xp.empty((N, H, W, C), dtype=dout.dtype) if input_grad else None

    def piece(n: slice, t: slice) -> None:
        V = _transformed_input(x, n, t)
        N_ = n.stop - n.start
        dM = output_transform_adjoint(dout[n], out=scratch("wino_M", (16, V.shape[1], F), dout.dtype, dout),
                                      work=scratch("wino_work", (4, 2, N_, th, tw, F), dout.dtype, dout))
        i = parallel.slot()
        db[i] += column_sums(dM[5])  # dM at (1, 1) is each tile's sum of its 4 pixels
        dU_q = scratch("wino_dU", (C, F), dout.dtype, dout)
        for q in range(16):
            dU[i, q] += xp.matmul(V[q].T, dM[q], out=dU_q)
        if dx is not None:
            dV = V  # V is spent: its buffer takes dV = dM U^T
            for q in range(16):
                xp.matmul(dM[q], U[q].T, out=dV[q])
            input_transform_adjoint(dV, (N_, th, tw), out=dx[n],
                                    work=scratch("wino_work", (2, 6, N_, th, tw, C), dout.dtype, dout))

    # Whole images only: the input transform's adjoint adds across the borders of tile rows.
    parallel.run_pieces(piece, parallel.pieces(N, th, tw, dout, bands=False), dout)
    return dx, filter_transform_adjoint(dU.sum(axis=0)), db.sum(axis=0)
