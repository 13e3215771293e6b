"""BatchNorm2d's forward and backward split over the CPU workers, BatchNorm folded into a conv,
and the U-Net's Upsample + Concat in one pass.

The same numbers as the textbook layers in nanocolor/layers.py, up to float rounding (partial
sums per piece, added in a fixed order). BatchNorm in training takes two passes over x, each
split in pieces sized to stay in cache: one read of x for the statistics (each piece's sums and
its squares about its own mean, combined exactly), then out = x * gamma / std + (beta - mean *
gamma / std), with the ReLU after it in the same pass when asked. x_hat is not stored: backward
keeps x and recomputes x - mean piece by piece, for the sums of dout and dout * x_hat, then for
dx, one read of dout and x each time.

In inference BatchNorm is a per-channel affine map, gamma / std * (conv(x) - mean) + beta, which
folds into the conv before it (`folded_weights`: weights scaled per output channel, the shift
as its bias).

These functions read a BatchNorm2d's params, buffers and settings and write its grads and
running statistics; what backward needs is in the cache they return.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import parallel
from .helpers import channel_rows, column_sums, per_channel, relu_into
from .workspace import prepared, scratch


def _cached_pieces(x):
    """(batch, rows) pieces of an (N, H, W, C) array of about 1 MiB each, so that the passes
    made over one piece after its first read find it in a core's L2 cache. Measured against
    256 KiB pieces (fewer numpy calls per byte): BatchNorm forward and backward 1.6-2x faster
    at 32x32x64 and 16x16x128 (batch 32), the same within noise on larger maps."""
    N, H, W, C = x.shape
    return parallel.pieces(N, H, W, x, target=max(1, (1 << 20) // (C * x.itemsize)))


def _affine(x, scale, shift, relu: bool, work: list):
    """x * scale + shift per channel, then max(., 0) with `relu`: one pass over x (N, H, W, C)."""
    xp = array_module(x)
    out = xp.empty_like(x)
    scale, shift = channel_rows(scale), channel_rows(shift)

    def piece(n: slice, y: slice) -> None:
        o = out[n, y]
        per_channel(xp.multiply, x[n, y], scale, o)
        per_channel(xp.add, o, shift, o)
        if relu:
            relu_into(o, o)

    parallel.run_pieces(piece, work, x)
    return out


def _batch_sums(bn, *partial):
    """Per-channel sums (C,) over this shard's pixels -> over the whole batch (bn.sum_over_batch under MPI)."""
    if bn.sum_over_batch is None:
        return partial
    return tuple(bn.sum_over_batch(array_module(partial[0]).stack(partial)))


def batchnorm2d_forward(bn, x, relu: bool = False) -> tuple:
    """BatchNorm2d's forward: x (N, H, W, C) -> (out (N, H, W, C), cache for backward, None in
    inference); in training it updates bn's running statistics, as the textbook layer does. With
    `relu`, max(out, 0) in the same pass (the ReLU that follows in a block), and backward takes
    the gradient of that ReLU's output.

    The batch statistics come from one read of x: each piece's sum s_i and its squares about its
    own mean q_i (n_i pixels), combined exactly as sum((x - mean)^2) = sum_i q_i + n_i (s_i / n_i - mean)^2.
    """
    xp = array_module(x)
    C = x.shape[-1]
    gamma, beta = bn.params["gamma"], bn.params["beta"]
    work = _cached_pieces(x)
    if not bn.training:
        scale = gamma / (bn.buffers["running_var"] + bn.eps) ** 0.5
        shift = beta - bn.buffers["running_mean"] * scale
        return _affine(x, scale, shift, relu, work), None
    sums = xp.empty((len(work), C), dtype=x.dtype)     # per piece: s_i
    squares = xp.empty((len(work), C), dtype=x.dtype)  # per piece: q_i
    counts = xp.asarray([(n.stop - n.start) * (y.stop - y.start) * x.shape[2] for n, y in work], dtype=x.dtype)

    def statistics(i: int) -> None:
        n, y = work[i]
        rows = x[n, y].reshape(-1, C)
        sums[i] = column_sums(rows)
        d = scratch("bn", rows.shape, x.dtype, x)
        per_channel(xp.subtract, rows, channel_rows(sums[i] / counts[i]), d)
        squares[i] = column_sums(xp.multiply(d, d, out=d))

    if isinstance(x, np.ndarray):
        parallel.run(statistics, len(work))
    else:
        for i in range(len(work)):
            statistics(i)
    P = x.size // C * bn.shards  # pixels in the whole batch
    mean = _batch_sums(bn, sums.sum(axis=0))[0] / P
    piece_means = sums / counts[:, None]
    spread = squares.sum(axis=0) + (counts[:, None] * (piece_means - mean) ** 2).sum(axis=0)
    var = _batch_sums(bn, spread)[0] / P
    inv_std = 1 / (var + bn.eps) ** 0.5
    scale = gamma * inv_std
    shift = beta - mean * scale
    out = _affine(x, scale, shift, relu, work)  # gamma * (x - mean) / std + beta
    m = bn.momentum  # the running variance is the unbiased estimate, as PyTorch keeps it
    bn.buffers["running_mean"] = (1 - m) * bn.buffers["running_mean"] + m * mean
    bn.buffers["running_var"] = (1 - m) * bn.buffers["running_var"] + m * var * (P / max(P - 1, 1))
    # x, not x_hat: backward recomputes x_hat piece by piece; with the ReLU, its output for the mask
    return out, (x, mean, inv_std, P, out if relu else None)


def batchnorm2d_backward(bn, dout, cache: tuple):
    """BatchNorm2d's backward, cache from batchnorm2d_forward in training: dout (N, H, W, C) -> dx;
    fills bn.grads. After a forward with `relu`, dout is the gradient of the ReLU's output: it
    passes where that was positive."""
    xp = array_module(dout)
    x, mean, inv_std, P, relu_out = cache
    C = dout.shape[-1]
    dx = xp.empty_like(dout)
    work = _cached_pieces(dout)
    partial = xp.zeros((2, parallel.slots(dout), C), dtype=dout.dtype)  # per worker: sum d, sum d * x_hat
    mean_row = channel_rows(mean)

    def centred(n: slice, y: slice):
        """x - mean of one piece, (pixels, C), in scratch."""
        rows = x[n, y].reshape(-1, C)
        t = scratch("bn", rows.shape, x.dtype, x)
        per_channel(xp.subtract, rows, mean_row, t)
        return t

    def sums(n: slice, y: slice) -> None:
        d = dout[n, y]
        if relu_out is not None:  # through the ReLU, into dx: the second pass reads it from there
            d = xp.multiply(d, relu_out[n, y] > 0, out=dx[n, y])
        d = d.reshape(-1, C)
        i = parallel.slot()
        partial[0, i] += column_sums(d)
        t = centred(n, y)
        partial[1, i] += column_sums(xp.multiply(t, d, out=t))

    parallel.run_pieces(sums, work, dout)
    dbeta, d_centred = partial.sum(axis=1)
    bn.grads["beta"], bn.grads["gamma"] = dbeta, d_centred * inv_std  # sum d * x_hat
    dbeta, dgamma = _batch_sums(bn, bn.grads["beta"], bn.grads["gamma"])
    # dx = gamma / std * (d - mean(d) - x_hat * mean(d * x_hat)), in one pass
    scale = bn.params["gamma"] * inv_std
    a, c = dgamma / P * inv_std, dbeta / P  # x_hat * mean(d * x_hat) = (x - mean) * a
    d_all = dout if relu_out is None else dx  # d, through the ReLU when there is one
    a, c, scale = channel_rows(a), channel_rows(c), channel_rows(scale)

    def grad(n: slice, y: slice) -> None:
        g = dx[n, y]
        t = centred(n, y)
        per_channel(xp.multiply, t, a, t)
        xp.subtract(d_all[n, y], t.reshape(g.shape), out=g)
        per_channel(xp.subtract, g, c, g)
        per_channel(xp.multiply, g, scale, g)

    parallel.run_pieces(grad, work, dout)
    return dx


def upsample_concat_forward(x, skip):
    """Upsample2d then Concat with `skip` in one pass: x (N, H, W, C), skip (N, 2H, 2W, Cs) ->
    (N, 2H, 2W, C + Cs), each pixel of x written straight into its 2x2 block of the joined map
    (no upsampled map is made and read again)."""
    xp = array_module(x)
    N, H, W, C = x.shape
    Cs = skip.shape[-1]
    out = xp.empty((N, 2 * H, 2 * W, C + Cs), dtype=xp.result_type(x, skip))
    blocks = out.reshape(N, H, 2, W, 2, C + Cs)    # [n, y, r, x, q] is pixel (2y + r, 2x + q)
    skip_blocks = skip.reshape(N, H, 2, W, 2, Cs)

    def piece(n: slice, y: slice) -> None:  # y: rows of x
        xp.copyto(blocks[n, y, :, :, :, :C], x[n, y, None, :, None, :])
        xp.copyto(blocks[n, y, :, :, :, C:], skip_blocks[n, y])

    parallel.map_rows(piece, N, H, 4 * W, x)
    return out


def folded_weights(conv, bn) -> tuple:
    """(W (k, k, C, F), b (F,)) of a conv followed by BatchNorm in inference, the BatchNorm folded
    in: W * gamma / std per output channel, beta + (b - mean) * gamma / std. Made once per set
    of weights for NumPy arrays (workspace.prepared)."""
    eps = bn.eps

    def fold(w, gamma, beta, mean, var, b=None):
        scale = gamma / (var + eps) ** 0.5
        shift = beta - mean * scale if b is None else beta + (b - mean) * scale
        return w * scale.astype(w.dtype), shift.astype(w.dtype)

    arrays = (conv.params["W"], bn.params["gamma"], bn.params["beta"], bn.buffers["running_mean"],
              bn.buffers["running_var"]) + ((conv.params["b"],) if "b" in conv.params else ())
    if isinstance(arrays[0], np.ndarray):
        return prepared(f"fold {eps}", arrays, fold)
    return fold(*arrays)
