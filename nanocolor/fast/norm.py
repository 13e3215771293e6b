"""BatchNorm2d and Concat split over the CPU workers, and a network's Conv (+ BatchNorm) + ReLU
blocks and the U-Net's Upsample + Concat in fewer passes over memory.

The same numbers as the textbook layers in nanocolor/layers.py, up to float rounding (partial
sums per piece, added in a fixed order). BatchNorm in training takes two passes over x, each
split in pieces sized to stay in cache: one read of x for the statistics (each piece's sums and
its squares about its own mean, combined exactly), then out = x * gamma / std + (beta - mean *
gamma / std). x_hat is not stored: backward keeps x and recomputes x - mean piece by piece, for
the sums of dout and dout * x_hat, then for dx, one read of dout and x each time.

Blocks (`fused_block_forward`): in inference, with the running statistics, BatchNorm is a per-channel
affine map, gamma / std * (conv(x) - mean) + beta, which folds into the conv itself (weights
scaled per output channel, the shift as its bias); the ReLU runs in the GEMM's epilogue on each
piece of the conv's output. One pass over the output instead of four. A Conv -> ReLU block
(the seed autoencoder) gets the ReLU in the epilogue too: in training with the caches its
backward reads, in inference with none. In training, a Conv ->
BatchNorm -> ReLU block runs the ReLU inside BatchNorm's normalizing pass, and the ReLU's mask
inside BatchNorm's backward (fused_block_backward). A decoder block runs together with the
Upsample (-> Concat) before it, its conv's upsampled part at the low resolution
(upsampled_block_forward, by upsampled.py or winograd4.py); where that does not apply, the
Upsample -> Concat is one pass (upsample_concat_forward).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import gemm, parallel, upsampled, winograd4
from .gemm import channel_rows, column_sums, per_channel, relu_into
from .workspace import prepared, scratch


def _pieces(x):
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


def batchnorm2d_forward(bn, x, relu: bool = False):
    """BatchNorm2d.forward of the fast engine: x (N, H, W, C) -> (N, H, W, C); sets bn.cache and,
    in training, bn's running statistics, as the textbook layer does. With `relu`, max(out, 0)
    in the same pass (the ReLU that follows in a block), and backward takes the gradient of
    that ReLU's output.

    The batch statistics come from one read of x: each piece's sum s_i and its squares about its
    own mean q_i (n_i pixels), combined exactly as sum((x - mean)^2) = sum_i q_i + n_i (s_i / n_i - mean)^2.
    """
    xp = array_module(x)
    C = x.shape[-1]
    gamma, beta = bn.params["gamma"], bn.params["beta"]
    work = _pieces(x)
    if not bn.training:
        scale = gamma / (bn.buffers["running_var"] + bn.eps) ** 0.5
        shift = beta - bn.buffers["running_mean"] * scale
        bn.cache = ("eval",)
        return _affine(x, scale, shift, relu, work)
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
    mean = bn._batch_sums(sums.sum(axis=0))[0] / P
    piece_means = sums / counts[:, None]
    spread = squares.sum(axis=0) + (counts[:, None] * (piece_means - mean) ** 2).sum(axis=0)
    var = bn._batch_sums(spread)[0] / P
    inv_std = 1 / (var + bn.eps) ** 0.5
    scale = gamma * inv_std
    shift = beta - mean * scale
    out = _affine(x, scale, shift, relu, work)  # gamma * (x - mean) / std + beta
    m = bn.momentum  # the running variance is the unbiased estimate, as PyTorch keeps it
    bn.buffers["running_mean"] = (1 - m) * bn.buffers["running_mean"] + m * mean
    bn.buffers["running_var"] = (1 - m) * bn.buffers["running_var"] + m * var * (P / max(P - 1, 1))
    # x, not x_hat: backward recomputes x_hat piece by piece; with the ReLU, its output for the mask
    bn.cache = ("fast", x, mean, inv_std, P, out if relu else None)
    return out


def batchnorm2d_backward(bn, dout):
    """BatchNorm2d.backward of the fast engine: dout (N, H, W, C) -> dx; fills bn.grads. After a
    forward with `relu`, dout is the gradient of the ReLU's output: it passes where that was positive."""
    xp = array_module(dout)
    _, x, mean, inv_std, P, relu_out = bn.cache
    C = dout.shape[-1]
    dx = xp.empty_like(dout)
    work = _pieces(dout)
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
    dbeta, dgamma = bn._batch_sums(bn.grads["beta"], bn.grads["gamma"])
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


def concat_forward(a, b):
    """(N, H, W, Ca), (N, H, W, Cb) -> (N, H, W, Ca + Cb), both halves copied by the workers."""
    xp = array_module(a)
    Ca = a.shape[-1]
    out = xp.empty(a.shape[:-1] + (Ca + b.shape[-1],), dtype=xp.result_type(a, b))

    def piece(n: slice, y: slice) -> None:
        xp.copyto(out[n, y, :, :Ca], a[n, y])
        xp.copyto(out[n, y, :, Ca:], b[n, y])

    parallel.run_pieces(piece, _pieces(out), out)
    return out


def concat_backward(dout, split: int) -> tuple:
    """dout (N, H, W, Ca + Cb) -> (da (N, H, W, Ca), db (N, H, W, Cb)) as views of dout: no copy.
    Their readers (the U-Net's upsample backward and the skip's gradient sum) take strided
    input as it is, and no layer changes its dout in place."""
    return dout[..., :split], dout[..., split:]


def upsample_concat_forward(up, cat, x, skip):
    """Upsample2d then Concat with `skip` in one pass: x (N, H, W, C), skip (N, 2H, 2W, Cs) ->
    (N, 2H, 2W, C + Cs), each pixel of x written straight into its 2x2 block of the joined map
    (no upsampled map is made and read again). Leaves up.cache and cat.split as the two layers
    would, for their backward passes; None under the textbook engine (the caller runs the layers)."""
    from .. import fast  # the package: engine state

    if not fast.enabled() or x.ndim != 4:
        return None
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
    up.cache, cat.split = ("fast",), C
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


def upsampled_block_forward(up, cat, layers: list, x, skip, inference: bool):
    """Upsample2d (then Concat with `skip`, if given) and the block `layers` after them, with the
    block's conv taken at x's resolution: x (N, h, w, C), skip (N, 2h, 2w, Cs) -> the block's output;
    None when this does not apply (the caller runs the layers): the low-resolution conv runs
    under the "auto" engine on the CPU for 3x3 kernels, the head's form below in inference
    wherever the engine would run that conv by gemm.py.

    The conv's upsampled channels run through upsampled.py (four output phases of 2x2 taps at the
    low resolution) and add into the skip channels' conv by the engine's own path; where that path
    is Winograd F(4x4), both are one F(4x4) conv whose upsampled channels are transformed from x
    itself (winograd4.forward's `upsampled`: U-Net steps at 64x64 4-6% faster), the backward
    split as before. No upsampled or joined map is made. In inference, a conv after a Concat that
    multiplies first where the engine would run it by gemm.py (the head: few outputs) instead adds
    the upsampled channels' products into the skip's before its shifted adds
    (gemm.multiply_then_shift): one pass fewer.
    BatchNorm in inference folds into the conv, and a ReLU right after the conv (or after a
    folded BatchNorm) runs in its last pass; the block leaves the caches upsampled_block_backward
    reads.
    """
    from .. import fast  # the package: engine state and conv seam
    from ..layers import BatchNorm2d, Conv2d, ReLU

    conv, rest = layers[0], list(layers[1:])
    if not fast.enabled() or x.ndim != 4 or type(conv) is not Conv2d:
        return None
    xp, (N, h, w_, C) = array_module(x), x.shape
    w, b = conv.params["W"], conv.bias
    k, F = w.shape[0], w.shape[-1]
    bn = rest[0] if rest and type(rest[0]) is BatchNorm2d else None
    if bn is not None and not bn.training:  # folded into the conv, as fused_block_forward does
        (w, b), rest, bn = folded_weights(conv, bn), rest[1:], None
        inference = True  # the folded conv has no backward
    relu = rest[0] if bn is None and rest and type(rest[0]) is ReLU else None  # into the conv's last pass
    joined_shape = (N, 2 * h, 2 * w_, w.shape[2])  # the engine is asked about it through a view of no data
    if inference and skip is not None and gemm.multiplies_first(w.shape[2], F, k) and \
            fast.conv2d_path(xp.broadcast_to(x[:1, :1, :1, :1], joined_shape), w) == "gemm":
        out, skip_cache = gemm.multiply_then_shift(skip, w, b, relu is not None, upsampled=x), None
    elif fast.get_engine() == "auto" and isinstance(x, np.ndarray) and upsampled.applies(k):
        if skip is None:
            out = xp.empty((N, 2 * h, 2 * w_, F), dtype=x.dtype)
            upsampled.add_forward(x, w, out, b=b, relu=relu is not None)
            skip_cache = None
        elif fast.conv2d_path(skip, w[:, :, C:]) == "winograd4":  # one conv, x's channels transformed from x
            out, skip_cache = winograd4.forward(skip, w, b, relu is not None, keep_v=not inference, upsampled=x)
        else:
            split = lambda w: (xp.ascontiguousarray(w[:, :, :C]), xp.ascontiguousarray(w[:, :, C:]))
            # in inference the same arrays each time, so that the skip's Winograd transform is prepared once too
            w_up, w_skip = prepared(f"split {C}", (w,), split) if inference else split(w)
            out, skip_cache = fast.conv2d_forward(skip, w_skip, b, fast.conv2d_path(skip, w_skip), inference=inference)
            upsampled.add_forward(x, w_up, out, relu=relu is not None)
    else:
        return None
    conv.cache = None if inference else ("upsampled", x, skip_cache)
    if relu is not None:
        relu.cache = None if inference else ("fast", out)
        rest = rest[1:]
    elif bn is not None and len(rest) > 1 and type(rest[1]) is ReLU:  # the ReLU in BatchNorm's pass
        rest[1].cache = None
        out, rest = batchnorm2d_forward(bn, out, relu=True), rest[2:]
    for layer in rest:
        out = layer.forward(out)
    return out


def upsampled_block_backward(layers: list, dout):
    """Backward of a block that upsampled_block_forward ran in training: dout (N, 2h, 2w, F) ->
    (dx (N, h, w, C) of the low-resolution input, dskip (N, 2h, 2w, Cs) or None); fills the
    block's grads. None if the block's last forward was not that (the caller runs the layers)."""
    from .. import fast  # the package: conv seam

    conv = layers[0]
    cache = getattr(conv, "cache", None)
    if not (isinstance(cache, tuple) and cache[0] == "upsampled"):
        return None
    _, x, skip_cache = cache
    if fused_in_training(layers):
        d = batchnorm2d_backward(layers[1], dout)
    else:
        d = dout
        for layer in reversed(layers[1:]):
            d = layer.backward(d)
    xp, w, C = array_module(d), conv.params["W"], x.shape[-1]
    dx, dw_up = upsampled.backward(d, x, xp.ascontiguousarray(w[:, :, :C]))
    if skip_cache is None:
        dskip, dw, db = None, dw_up, column_sums(d.reshape(-1, d.shape[-1]))
    else:
        dskip, dw_skip, db = fast.conv2d_backward(d, xp.ascontiguousarray(w[:, :, C:]), skip_cache)
        dw = xp.concatenate([dw_up, dw_skip], axis=2)
    conv._store_grads(dw, db)
    return dx, dskip


def fused_block_forward(layers: list, x, inference: bool = False):
    """A conv block of the network as one conv with the ReLU in its GEMMs' epilogue, when the
    engine is not the textbook "im2col"; else None (the caller runs the layers one by one):

    - Conv2d -> BatchNorm2d in inference -> ReLU (the U-Net): BatchNorm folded into the conv's
      weights and bias.
    - Conv2d -> ReLU (the seed autoencoder): the conv and the ReLU keep the caches their backward
      passes read, as if each had run alone; with `inference` (no backward follows), none.
    """
    from .. import fast  # the package: engine state and conv seam
    from ..layers import BatchNorm2d, Conv2d, ReLU

    if not fast.enabled() or len(layers) not in (2, 3) or type(layers[0]) is not Conv2d or \
            type(layers[-1]) is not ReLU:
        return None
    conv, relu = layers[0], layers[-1]
    w, b = conv.params["W"], conv.bias
    if len(layers) == 3:
        bn = layers[1]
        if type(bn) is not BatchNorm2d:
            return None
        if bn.training:  # the ReLU in BatchNorm's normalizing pass; fused_block_backward runs back through both
            out, conv.cache = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w))
            relu.cache = None
            return batchnorm2d_forward(bn, out, relu=True)
        w, b = folded_weights(conv, bn)
        inference = True
    if inference:
        out, _ = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w), relu=True, inference=True)
        conv.cache = relu.cache = None  # nothing for a backward
        return out
    out, conv.cache = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w), relu=True)
    relu.cache = ("fast", out)
    return out


def fused_in_training(layers: list) -> bool:
    """Whether the last forward of this block was fused_block_forward's Conv2d + BatchNorm2d + ReLU
    in training (the ReLU inside BatchNorm's pass): then fused_block_backward must run its backward."""
    bn_cache = getattr(layers[1], "cache", None) if len(layers) == 3 else None
    return isinstance(bn_cache, tuple) and bn_cache[0] == "fast" and bn_cache[5] is not None


def fused_block_backward(layers: list, dout):
    """Backward of a block for which fused_in_training holds: dout (N, H, W, F) of the ReLU's output
    -> the conv's dx (None without input_grad); fills the conv's and BatchNorm's grads."""
    conv, bn, _ = layers
    return conv.backward(batchnorm2d_backward(bn, dout))
