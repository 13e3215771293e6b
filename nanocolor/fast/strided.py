"""Convolutions with a stride or a padding other than 'same' (the critic's downsampling convs):
a patch matrix and one GEMM per piece of images.

As in the textbook (layers.Conv2d), forward keeps the patch matrix for dW = cols^T dout; here
each piece of whole images builds its rows on a CPU worker and multiplies them while they are
in cache, and a LeakyReLU after the conv runs on each piece of the output there too. Backward
does not add the patches' gradients back with col2im, which adds C values at a time: each
tap's d W[i, j]^T goes into one phase of the piece's own dx as a block of whole rows (whole
images per piece: no two workers add into the same pixels).

Shapes (channels-last): x (N, H, W, C), w (k, k, C, F), b (F,), out and dout (N, Ho, Wo, F)
with Ho = (H + 2p - k) // s + 1 for stride s and padding p.
"""
from __future__ import annotations

from ..backend import array_module
from ..layers import conv_output_size
from . import parallel
from .helpers import (CHANNELS_LAST_MIN_F, column_sums, leaky_relu_into, pad_rows, patch_matrix_pieces, pixel_rows,
                      weight_grad)
from .workspace import scratch

def _patches(x_pad, k: int, s: int, Ho: int, Wo: int):
    """Every k x k patch of x_pad at stride s, a (n, Ho, Wo, k, k, C) view (no copy)."""
    n, _, _, C = x_pad.shape
    sN, sH, sW, sC = x_pad.strides
    return array_module(x_pad).lib.stride_tricks.as_strided(
        x_pad, shape=(n, Ho, Wo, k, k, C), strides=(sN, s * sH, s * sW, sH, sW, sC))


def patch_matrix(x, k: int, s: int, p: int, cols):
    """im2col of x (n, H, W, C) at stride s with padding p into cols (n*Ho*Wo, k*k*C)."""
    n, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, k, s, p), conv_output_size(W, k, s, p)
    array_module(x).copyto(cols.reshape(n, Ho, Wo, k, k, C), _patches(pad_rows(x, slice(0, H), p, "strided_pad"), k, s, Ho, Wo))
    return cols


def forward(x, w, b, stride: int, padding: int, slope: float | None = None) -> tuple:
    """x (N, H, W, C) -> (out (N, Ho, Wo, F), cache for `backward`); with `slope`, the
    LeakyReLU max(out, slope * out) on each piece of the output."""
    xp = array_module(x)
    N, H, W, C = x.shape
    k, F = w.shape[0], w.shape[-1]
    Ho, Wo = conv_output_size(H, k, stride, padding), conv_output_size(W, k, stride, padding)
    w2d = w.reshape(k * k * C, F)
    out = xp.empty((N, Ho, Wo, F), dtype=x.dtype)
    cols = xp.empty((N, Ho * Wo, k * k * C), dtype=x.dtype)

    def piece(n: slice, _: slice) -> None:
        o = pixel_rows(out[n])
        xp.matmul(patch_matrix(x[n], k, stride, padding, cols[n].reshape(-1, k * k * C)), w2d, out=o)
        o += b
        if slope is not None:
            leaky_relu_into(o, slope)

    parallel.run_pieces(piece, patch_matrix_pieces(N, Ho, Wo, x, k * k * C, bands=False), x)
    return out, ("strided", x.shape, stride, padding, cols)


def backward(dout, cache: tuple, w, input_grad: bool = True) -> tuple:
    """dout (N, Ho, Wo, F) -> (dx (N, H, W, C) or None without input_grad, dW (k, k, C, F), db (F,)).

    dx by phases: pixel (s*y + i, s*x + j) of x_pad is pixel (y + i//s, x + j//s) of phase
    (i % s, j % s), so tap (i, j)'s gradient dout W[i, j]^T adds into one phase as a block of
    whole rows (a col2im adding into x_pad itself runs over C values at a time: 3x slower).
    """
    xp = array_module(dout)
    _, (N, H, W, C), s, p, cols = cache
    k, F = w.shape[0], w.shape[-1]
    Ho, Wo = dout.shape[1:3]
    dw = xp.zeros((parallel.slots(dout), k * k * C, F), dtype=dout.dtype)  # partial sums, one per worker
    db = xp.zeros((parallel.slots(dout), F), dtype=dout.dtype)
    dx = xp.empty((N, H, W, C), dtype=dout.dtype) if input_grad else None
    Hq, Wq = max(Ho + (k - 1) // s, -(-(H + 2 * p) // s)), max(Wo + (k - 1) // s, -(-(W + 2 * p) // s))
    thin = C < CHANNELS_LAST_MIN_F
    w_taps = xp.ascontiguousarray(w.reshape(k * k * C, F) if thin else w.transpose(0, 1, 3, 2))  # (k*k*C, F) or (k, k, F, C)
    add_taps = _taps_as_planes if thin else _taps_channels_last

    def piece(n: slice, _: slice) -> None:
        d = dout[n].reshape(-1, F)
        dw[parallel.slot()] += weight_grad(cols[n].reshape(-1, k * k * C), d)
        db[parallel.slot()] += column_sums(d)
        if not input_grad:
            return
        phase = add_taps(d, w_taps, k, (n.stop - n.start, Ho, Wo, C), s, (Hq, Wq))
        for r in range(s):  # back to pixels: pixel y of x is row (y + p) // s of phase (y + p) % s
            for q in range(s):
                y0, x0 = (r - p) % s, (q - p) % s  # the first pixels of x in this phase
                Y0, X0 = (y0 + p) // s, (x0 + p) // s
                dx[n, y0::s, x0::s] = phase(r, q)[:, Y0:Y0 + len(range(y0, H, s)), X0:X0 + len(range(x0, W, s))]

    # whole images per piece: no two workers add into the same pixels of dx
    parallel.run_pieces(piece, patch_matrix_pieces(N, Ho, Wo, dout, k * k * C, bands=False), dout)
    return dx, dw.sum(axis=0).reshape(w.shape), db.sum(axis=0)


def _taps_channels_last(d, w_taps, k: int, shape: tuple, s: int, phase_size: tuple):
    """Every tap's d W[i, j]^T (one GEMM each, d (P, F), w_taps (k, k, F, C)) added into its phase
    (s, s, n, Hq, Wq, C) in scratch; returns phase(r, q), a (n, Hq, Wq, C) view."""
    xp = array_module(d)
    n, Ho, Wo, C = shape
    phases = scratch("strided_phases", (s, s, n) + phase_size + (C,), d.dtype, d)
    phases[...] = 0
    tap = scratch("strided_tap", shape, d.dtype, d)
    for i in range(k):
        for j in range(k):
            xp.matmul(d, w_taps[i, j], out=tap.reshape(-1, C))
            phases[i % s, j % s, :, i // s:i // s + Ho, j // s:j // s + Wo] += tap
    return lambda r, q: phases[r, q]


def _taps_as_planes(d, w_taps, k: int, shape: tuple, s: int, phase_size: tuple):
    """For thin inputs (C < CHANNELS_LAST_MIN_F: the critic's pair): one GEMM W dout^T whose rows
    are the taps' gradients as planes (n, Ho, Wo), added along whole rows into channels-first
    phases (s, s, C, n, Hq, Wq) in scratch; returns phase(r, q), a (n, Hq, Wq, C) view."""
    xp = array_module(d)
    n, Ho, Wo, C = shape
    phases = scratch("strided_phases", (s, s, C, n) + phase_size, d.dtype, d)
    phases[...] = 0
    planes = xp.matmul(w_taps, d.T, out=scratch("strided_tap", (k * k * C, n * Ho * Wo), d.dtype, d))
    planes = planes.reshape(k, k, C, n, Ho, Wo)
    for i in range(k):
        for j in range(k):
            phases[i % s, j % s, :, :, i // s:i // s + Ho, j // s:j // s + Wo] += planes[i, j]
    return lambda r, q: phases[r, q].transpose(1, 2, 3, 0)
