"""Helpers every algorithm of the fast engine shares: padding a band of rows, per-channel and
ReLU passes over long rows, column sums, and the products that OpenBLAS runs fastest in small
pieces. Shapes are channels-last, (N, H, W, C); P = pixels of a piece.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .workspace import scratch

CHANNELS_LAST_MIN_F = 8  # runs of F values this long are added channels-last (gemm.multiply_then_shift, upsampled.py)


def pad_rows(x, rows: slice, p: int, tag: str):
    """Rows `rows` of x (N, H, W, C) with p more rows above and below (zeros beyond the image) and
    p zero columns each side: (N, len(rows) + 2p, W + 2p, C), in a scratch buffer.

    With all rows this is 'same' zero padding; a band of rows gets its neighbours' rows.
    """
    N, H, W, C = x.shape
    y0, y1 = rows.start, rows.stop
    out = scratch(tag, (N, y1 - y0 + 2 * p, W + 2 * p, C), x.dtype, x)
    lo, hi = max(0, y0 - p), min(H, y1 + p)  # the rows that exist
    top = lo - (y0 - p)
    out[:, :top] = 0
    out[:, top + hi - lo:] = 0
    out[:, top:top + hi - lo, :p] = 0
    out[:, top:top + hi - lo, W + p:] = 0
    out[:, top:top + hi - lo, p:p + W] = x[:, lo:hi]
    return out


def pixel_rows(a):
    """(n, h, w, c) slice of a fresh contiguous array -> its (n*h*w, c) view, written through."""
    rows = a.reshape(-1, a.shape[-1])
    if rows.size and not array_module(a).may_share_memory(rows, a):  # pragma: no cover - a bug guard
        raise ValueError("piece of an output array is not contiguous")
    return rows


def column_sums(rows):
    """(P, F) -> (F,) sums over the rows, as a matrix-vector product: several times faster than
    rows.sum(axis=0), which walks the rows one by one (and than einsum for products summed)."""
    return array_module(rows).ones(rows.shape[0], dtype=rows.dtype) @ rows


LONG_ROWS = 8192  # NumPy's ufunc buffer: broadcasting over rows this long runs ~2x faster than over C


def channel_rows(vector):
    """A per-channel vector (C,) repeated to a row of at least LONG_ROWS values, for per_channel."""
    C = vector.shape[0]
    return array_module(vector).tile(vector, -(-LONG_ROWS // C))


def per_channel(op, a, row, out) -> None:
    """op(a, vector, out=out) for contiguous a and out (..., C) and row = channel_rows(vector): the
    numbers NumPy's broadcasting gives, over rows of LONG_ROWS values instead of C. A ufunc whose
    broadcast operand repeats every C = 32-128 values runs on short inner loops, measured 85-95 us
    per MiB against 42 us over long rows (NumPy 2.4, one core)."""
    if not (a.flags.c_contiguous and out.flags.c_contiguous):  # reshaping would copy: broadcast as usual
        op(a, row[:a.shape[-1]], out=out)
        return
    a_flat, out_flat, L = a.reshape(-1), out.reshape(-1), row.shape[0]
    whole = a_flat.shape[0] // L * L
    if whole:
        op(a_flat[:whole].reshape(-1, L), row, out=out_flat[:whole].reshape(-1, L))
    if whole < a_flat.shape[0]:  # the rest: fewer than L values, a whole number of pixels
        op(a_flat[whole:], row[:a_flat.shape[0] - whole], out=out_flat[whole:])


_zero_rows: dict = {}


def relu_into(a, out) -> None:
    """out = max(a, 0), a and out (..., C) of one shape (out may be a). NumPy 2.4 takes max(a, 0)
    with a scalar 0 on a slow loop, 120 us per MiB on this machine; against a row of zeros
    broadcast over long rows, 31-44 us (per_channel). The same numbers."""
    xp = array_module(a)
    key = (xp.__name__, getattr(getattr(a, "device", None), "id", None), a.dtype.str)  # a GPU's own zeros
    if key not in _zero_rows:
        _zero_rows[key] = xp.zeros(LONG_ROWS, dtype=a.dtype)
    per_channel(xp.maximum, a, _zero_rows[key], out)


def leaky_relu_into(a, slope: float) -> None:
    """a = max(a, slope * a) in place: the LeakyReLU for 0 <= slope < 1."""
    xp = array_module(a)
    scaled = scratch("leaky", a.shape, a.dtype, a)
    xp.multiply(a, slope, out=scaled)
    xp.maximum(a, scaled, out=a)


PIECE_PATCH_BYTES = 1 << 20  # thin patch matrices (few input channels) come in pieces of about this much


def patch_matrix_pieces(N: int, H: int, W: int, like, columns: int, bands: bool = True) -> list:
    """parallel.pieces for a patch matrix of `columns` columns: pieces of at least 4096 pixels and
    about PIECE_PATCH_BYTES, since for thin ones (the lightness image's 9 columns) the numpy calls
    per piece cost more than the bytes; measured 2x faster for the first conv than 4096 pixels.
    `bands=False`: whole images per piece only."""
    return parallel.pieces(N, H, W, like, bands=bands,
                           target=max(4096, PIECE_PATCH_BYTES // (columns * like.itemsize)))


SMALL_PRODUCT = 1_000_000  # OpenBLAS multiplies M x K by K x N without packing up to M*N*K this big


def small_matmul(a, b, out) -> None:
    """out = a @ b for a small matrix a (M, K) and b (..., K, X) with many columns (Winograd's
    transforms: 6 x 6 by 6 x tiles*channels), in chunks of columns that OpenBLAS multiplies with
    its small-matrix kernels (M*K*chunk <= SMALL_PRODUCT): measured 2-2.3x faster than one call,
    whose packing copies all of b first."""
    xp, (M, K), X = array_module(b), a.shape, b.shape[-1]
    chunk = X if not isinstance(b, np.ndarray) else max(1, SMALL_PRODUCT // (M * K))
    for start in range(0, X, chunk):
        xp.matmul(a, b[..., start:start + chunk], out=out[..., start:start + chunk])


def add_thin_product(a, b, acc) -> None:
    """acc += a @ b for a (M, K) and b (K, N) with a long K: weight gradients, patches^T @ dout.
    Where M and N are small (the first conv's 9 x pixels by pixels x F, the head's C x pixels by
    pixels x 18), in chunks of K that OpenBLAS multiplies with its small-matrix kernels, which
    read the operands as they lie: measured 1.4-2.5x faster than one product, whose packing
    copies all of b first."""
    xp, (M, K) = array_module(a), a.shape
    chunk = SMALL_PRODUCT // (M * b.shape[1])
    if chunk < 1024 or not isinstance(a, np.ndarray):  # wide products (or a GPU's): one call
        chunk = K
    product = scratch("thin_product", acc.shape, acc.dtype, acc)
    for start in range(0, K, chunk):
        acc += xp.matmul(a[:, start:start + chunk], b[start:start + chunk], out=product)


def weight_grad(cols, dout2d):
    """cols^T @ dout, (K, F): the longer side first, as OpenBLAS is very slow on a tiny K x P @ P x F."""
    if cols.shape[1] >= dout2d.shape[1]:
        return cols.T @ dout2d
    return (dout2d.T @ cols).T


def transform_adjoint(dU, g):
    """Adjoint of a Winograd filter transform U = g w g^T, g (m, 3): dU (m*m, C, F), or partial
    sums of it (S, m*m, C, F), -> dw = g^T dU g, (3, 3, C, F). Large filters are split over the
    CPU workers by input channel, each adding up its channels' partial sums first."""
    xp = array_module(dU)
    partials = dU if dU.ndim == 4 else dU[None]
    S, _, C, F = partials.shape
    m = g.shape[0]
    g_t = xp.asarray(g.T.astype(dU.dtype))  # (3, m)
    dw = xp.empty((3, 3, C, F), dtype=dU.dtype)

    def part(c: slice, _: slice) -> None:
        C_ = c.stop - c.start
        total = xp.ascontiguousarray(partials[0, :, c]) if S == 1 else partials[:, :, c].sum(axis=0)
        rows = xp.matmul(g_t, total.reshape(m, m * C_ * F))                          # g^T along the rows
        dw[:, :, c] = xp.matmul(g_t, rows.reshape(3, m, C_ * F)).reshape(3, 3, C_, F)  # then the columns

    parts = parallel.slots(dU) if C * F >= 1 << 15 else 1
    parallel.run_pieces(part, [(slice(a, b), None) for a, b in parallel.split(C, parts)], dU)
    return dw
