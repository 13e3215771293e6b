"""Layers of a convolutional network, each with a forward and a backward pass.

Shape legend (channels-last, so a 3x3 conv is one matrix multiply without transposes):
    N, H, W, C = batch, height, width, channels
    F          = output channels (filters) of a conv, k = kernel size, P = N * H * W pixels
A layer's `forward(x)` caches what its `backward(dout)` needs; `backward` returns dx (never
changing dout in place) and writes parameter gradients into `self.grads`, beside `self.params`.
Outputs and gradients are fresh arrays owned by the caller; temporaries live in `scratch`
buffers (one per tag and CPU worker, grown to the largest use), so a training step allocates
little besides its results. On the CPU, convolutions, pooling and activations split their work
into pieces of the batch (or row bands of a single image) run side by side by the worker
threads of nanocolor.parallel.
"""
from __future__ import annotations

import threading

import numpy as np

from . import parallel, winograd
from .backend import array_module


class Layer:
    """Base class: a layer with no parameters."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.grads: dict = {}

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - interface
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Convolution helpers: padding, patch matrices (im2col) and their adjoint (col2im).

_workspace: dict = {}


def scratch(tag: str, shape: tuple, dtype, like):
    """A view of shape `shape` into the calling thread's reusable buffer for `tag`.

    One buffer per (tag, thread, dtype), grown to the largest size asked for and shared by all
    layers, which run one after another; work split over the CPU workers gets one per worker.
    Scratch holds temporaries only: its contents are undefined until written.
    """
    xp = array_module(like)
    dtype = xp.dtype(dtype)
    size = int(np.prod(shape))
    key = (tag, threading.get_ident(), dtype.str, xp.__name__)
    buf = _workspace.get(key)
    if buf is None or buf.size < size:
        buf = _workspace[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def patches(x_pad, k: int, H: int, W: int):
    """(N, H+k-1, W+k-1, C) -> strided view (N, H, W, k, k, C) of every k x k patch, no copy."""
    xp = array_module(x_pad)
    N, _, _, C = x_pad.shape
    sN, sH, sW, sC = x_pad.strides
    return xp.lib.stride_tricks.as_strided(
        x_pad, shape=(N, H, W, k, k, C), strides=(sN, sH, sW, sH, sW, sC))


def im2col(x_pad, k: int, H: int, W: int, out=None):
    """(N, H+k-1, W+k-1, C) padded input -> (N*H*W, k*k*C) patch matrix, in one copy.

    Row (n, y, x) holds the patch whose top-left corner is pixel (y, x) of the padded input.
    """
    xp = array_module(x_pad)
    N, _, _, C = x_pad.shape
    if out is None:
        out = xp.empty((N * H * W, k * k * C), dtype=x_pad.dtype)
    xp.copyto(out.reshape(N, H, W, k, k, C), patches(x_pad, k, H, W))
    return out


def col2im(cols, x_pad_shape: tuple, k: int, H: int, W: int):
    """Adjoint of im2col: (N*H*W, k*k*C) -> (N, H+k-1, W+k-1, C), summing overlapping patches.

    k*k shifted slice-adds, one per kernel offset (never a loop over pixels).
    """
    xp = array_module(cols)
    N, _, _, C = x_pad_shape
    cols = cols.reshape(N, H, W, k, k, C)
    dx_pad = xp.zeros(x_pad_shape, dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            dx_pad[:, i:i + H, j:j + W, :] += cols[:, :, :, i, j, :]
    return dx_pad


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


def pad_into(x, p: int, tag: str):
    """Zero-pad H and W of x (N, H, W, C) by p, into a scratch buffer."""
    return pad_rows(x, slice(0, x.shape[1]), p, tag)


def patch_matrix(x, k: int, tag: str, rows: slice | None = None):
    """im2col of x (N, H, W, C) with 'same' zero padding -> (N*H*W, k*k*C), in a scratch buffer;
    with `rows`, only the patch-matrix rows of those image rows, (N*len(rows)*W, k*k*C).

    A 1x1 kernel needs no copy: the patch matrix is x itself.
    """
    N, H, W, C = x.shape
    rows = rows if rows is not None else slice(0, H)
    if k == 1:
        return x[:, rows].reshape(-1, C)
    x_pad = pad_rows(x, rows, k // 2, "pad")
    n_rows = rows.stop - rows.start
    return im2col(x_pad, k, n_rows, W, out=scratch(tag, (N * n_rows * W, k * k * C), x.dtype, x))


# ---------------------------------------------------------------------------------------------
# Convolution.

class Conv2d(Layer):
    """k x k convolution, stride 1, 'same' zero padding, with bias. x (N, H, W, C) -> (N, H, W, F).

    Weights (k, k, C, F) are He-initialized: std sqrt(2 / (k*k*C)), right for ReLU networks.
    Three ways to compute the same numbers, chosen by `method`:
      "im2col"   the textbook reference: patch matrix + one GEMM forward, kept for backward;
                 dW = cols^T dout; dx as a convolution of dout with the flipped kernel, or with
                 `dx_method = "col2im"` the scatter-add of the column gradients.
      "gemm"     one GEMM per pass and piece, patch matrices built piece by piece in scratch
                 and never kept: backward builds the patch matrix of dout and gets both dx
                 (dcols W_flipped) and dW (x^T dcols) from it; thin outputs (4F <= C) multiply
                 first and add k*k shifted slices after.
      "winograd" Winograd F(2x2, 3x3) (nanocolor.winograd) for 3x3 kernels on even H and W:
                 2.25x fewer multiplies as 16 GEMMs per pass and piece, between cheap
                 transforms; other shapes fall back to "gemm".
      "auto"     (default) "winograd" where it applies and both channel counts reach
                 `winograd_min_channels`, on the CPU when BLAS runs one thread per call (the
                 nanocolor.parallel pool hands out the 16 GEMMs); "gemm" otherwise. With
                 OpenBLAS threading each call itself, 16 calls per pass wait 16 times for a
                 descheduled thread when other processes share the cores.
    `dx_method = "col2im"` always selects the textbook path.
    """

    METHODS = ("auto", "gemm", "winograd", "im2col")
    method = "auto"
    dx_method = "transposed_conv"
    auto_winograd = True
    winograd_min_channels = 16

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, rng=None, dtype=np.float32, bias: bool = True):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("'same' padding needs an odd kernel size")
        rng = rng if rng is not None else np.random.default_rng()
        std = np.sqrt(2.0 / (kernel * kernel * c_in))
        self.k, self.c_in, self.c_out = kernel, c_in, c_out
        self.params = {"W": (rng.standard_normal((kernel, kernel, c_in, c_out)) * std).astype(dtype)}
        if bias:  # a conv followed by BatchNorm has none: BatchNorm subtracts any constant again
            self.params["b"] = np.zeros(c_out, dtype=dtype)
        self.grads = {name: None for name in self.params}
        self.input_grad = True  # the first layer of a network may skip computing dx

    @property
    def bias(self):
        """(F,) the bias, zeros for a conv without one."""
        W = self.params["W"]
        return self.params["b"] if "b" in self.params else array_module(W).zeros(self.c_out, dtype=W.dtype)

    def _set_bias_grad(self, dout_rows) -> None:
        """db = the sum of dout over every pixel (rows (P, F)), for a conv that has a bias."""
        if "b" in self.params:
            self.grads["b"] = dout_rows.sum(axis=0)

    def path(self, H: int, W: int, on_cpu: bool = True) -> str:
        """The method forward/backward take at image size H x W: 'im2col', 'gemm' or 'winograd'."""
        if self.method not in self.METHODS:
            raise ValueError(f"Conv2d.method must be one of {self.METHODS}, got {self.method!r}")
        if self.method == "im2col" or self.dx_method == "col2im":
            return "im2col"
        if not winograd.applies(self.k, H, W) or self.method not in ("winograd", "auto"):
            return "gemm"
        if self.method == "winograd":
            return "winograd"
        worth_it = min(self.c_in, self.c_out) >= self.winograd_min_channels
        return "winograd" if worth_it and self.auto_winograd and on_cpu and parallel.blas_single_threaded() else "gemm"

    def _own_buffer(self, name: str, shape: tuple, like):
        """A buffer kept by this layer from forward to backward, reallocated only on a new shape."""
        xp = array_module(like)
        buf = getattr(self, name, None)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != like.dtype or array_module(buf) is not xp:
            buf = xp.empty(shape, dtype=like.dtype)
            setattr(self, name, buf)
        return buf

    def forward(self, x):
        N, H, W, C = x.shape
        method = self.path(H, W, on_cpu=isinstance(x, np.ndarray))
        if method == "winograd":
            return self._forward_winograd(x)
        if method == "gemm":
            return self._forward_gemm(x)
        k, F = self.k, self.c_out
        x_pad = pad_into(x, k // 2, "pad")
        # The patch matrix is kept for backward (dW needs it): one buffer per layer and shape.
        cols = im2col(x_pad, k, H, W, out=self._own_buffer("_cols", (N * H * W, k * k * C), x))
        out = cols @ self.params["W"].reshape(k * k * C, F)
        out += self.bias
        self.cache = ("im2col", cols, x.shape)
        return out.reshape(N, H, W, F)

    def backward(self, dout):
        method = self.cache[0]
        if method == "winograd":
            return self._backward_winograd(dout)
        if method == "gemm":
            return self._backward_gemm(dout)
        _, cols, (N, H, W, C) = self.cache
        k, F = self.k, self.c_out
        dout2d = dout.reshape(N * H * W, F)
        self.grads["W"] = _weight_grad(cols, dout2d).reshape(self.params["W"].shape)
        self._set_bias_grad(dout2d)
        if not self.input_grad:
            return None
        if self.dx_method == "col2im":
            dcols = dout2d @ self.params["W"].reshape(k * k * C, F).T     # (N*H*W, k*k*C)
            p = k // 2
            return col2im(dcols, (N, H + 2 * p, W + 2 * p, C), k, H, W)[:, p:p + H, p:p + W, :]
        # dx[y, x, c] = sum_{i, j, f} dout_pad[y + i, x + j, f] * W[k-1-i, k-1-j, c, f]
        dcols = patch_matrix(dout, k, "cols")
        return (dcols @ self._flipped_weights()).reshape(N, H, W, C)

    def _flipped_weights(self):
        """(k*k*F, C): the kernel rotated by 180 degrees with C and F swapped, for dx."""
        k, C, F = self.k, self.c_in, self.c_out
        return self.params["W"][::-1, ::-1].transpose(0, 1, 3, 2).reshape(k * k * F, C)

    # -- "gemm" ---------------------------------------------------------------------------------
    def _forward_gemm(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        k, F = self.k, self.c_out
        self.cache = ("gemm", x)
        if 4 * F <= C and k > 1:
            return _conv_multiply_then_shift(x, self.params["W"], self.bias)
        w2d, b = self.params["W"].reshape(k * k * C, F), self.bias
        out = xp.empty((N, H, W, F), dtype=x.dtype)

        def piece(n: slice, y: slice) -> None:
            o = _pixel_rows(out[n, y])
            xp.matmul(patch_matrix(x[n], k, "cols", y), w2d, out=o)
            o += b

        _run_pieces(piece, _pieces(N, H, W, x), x)
        return out

    def _backward_gemm(self, dout):
        xp = array_module(dout)
        _, x = self.cache
        N, H, W, C = x.shape
        k, F = self.k, self.c_out
        pieces = _pieces(N, H, W, dout)
        db = xp.zeros((parallel.workers(), F), dtype=dout.dtype)  # partial sums, one per worker
        if not self.input_grad:  # only dW = cols^T dout, with x's patch matrix rebuilt piece by piece
            dw = xp.zeros((parallel.workers(), k * k * C, F), dtype=dout.dtype)

            def weight_grad(n: slice, y: slice) -> None:
                d = dout[n, y].reshape(-1, F)
                dw[parallel.slot()] += _weight_grad(patch_matrix(x[n], k, "cols", y), d)
                db[parallel.slot()] += d.sum(axis=0)

            _run_pieces(weight_grad, pieces, dout)
            self.grads["W"] = dw.sum(axis=0).reshape(self.params["W"].shape)
            self._set_bias_grad(db)
            return None
        # One patch matrix of dout serves both gradients (dcols[(n,y,x), (i,j,f)] = dout_pad[n, y+i, x+j, f]):
        #   dx = dcols @ W_flipped                       (a convolution with the flipped kernel)
        #   dW[i, j] = (x^T dcols)[:, (k-1-i, k-1-j, :)]   (pixel y + k-1-i of dout_pad is y - (i - k//2))
        w_flipped = self._flipped_weights()
        dx = xp.empty((N, H, W, C), dtype=dout.dtype)
        dw = xp.zeros((parallel.workers(), C, k * k * F), dtype=dout.dtype)

        def products(n: slice, y: slice) -> None:
            dcols = patch_matrix(dout[n], k, "cols", y)
            xp.matmul(dcols, w_flipped, out=_pixel_rows(dx[n, y]))
            dw_piece = xp.matmul(x[n, y].reshape(-1, C).T, dcols, out=scratch("dW", dw.shape[1:], dw.dtype, dw))
            dw[parallel.slot()] += dw_piece
            db[parallel.slot()] += dout[n, y].reshape(-1, F).sum(axis=0)

        _run_pieces(products, pieces, dout)
        dw_flipped = dw.sum(axis=0).reshape(C, k, k, F)
        self.grads["W"] = xp.ascontiguousarray(dw_flipped[:, ::-1, ::-1].transpose(1, 2, 0, 3))
        self._set_bias_grad(db)
        return dx

    # -- "winograd" -----------------------------------------------------------------------------
    # Each piece of the batch runs the whole pipeline (transform, 16 GEMMs, transform) in its
    # worker's scratch, so the transformed arrays stay small and no layer keeps them: backward
    # transforms its input again rather than holding 4x the input from forward.
    def _winograd_input(self, x, n: slice, t: slice):
        """V = B^T x_tile B of tile rows t of images n: (16, tiles, C), in scratch."""
        W, C = x.shape[2], x.shape[3]
        N_, T_, tw = n.stop - n.start, t.stop - t.start, W // 2
        x_split = winograd.pad_and_split(x[n], slice(2 * t.start, 2 * t.stop),
                                         out=scratch("pad", (N_, 2 * T_ + 2, 2, tw + 1, C), x.dtype, x))
        return winograd.input_transform(x_split, out=scratch("wino_V", (16, N_ * T_ * tw, C), x.dtype, x),
                                        work=scratch("wino_work", (4, N_, 2 * T_ + 2, tw, C), x.dtype, x))

    def _forward_winograd(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        F, tw = self.c_out, W // 2
        U = winograd.filter_transform(self.params["W"])
        b = self.bias
        out = xp.empty((N, H, W, F), dtype=x.dtype)

        def piece(n: slice, t: slice) -> None:
            V = self._winograd_input(x, n, t)
            M = scratch("wino_M", (16, V.shape[1], F), x.dtype, x)
            for q in range(16):
                xp.matmul(V[q], U[q], out=M[q])
            M[5] += b  # position (1, 1) reaches all four pixels of a tile with weight 1
            tiles = (n.stop - n.start, t.stop - t.start, tw)
            winograd.output_transform(M, tiles, out=out[n, 2 * t.start:2 * t.stop],
                                      work=scratch("wino_work", (2, 4) + M.shape[1:], x.dtype, x))

        _run_pieces(piece, _pieces(N, H // 2, tw, x), x)
        self.cache = ("winograd", x, U)
        return out

    def _backward_winograd(self, dout):
        xp = array_module(dout)
        _, x, U = self.cache
        N, H, W, C = x.shape
        F, th, tw = self.c_out, H // 2, W // 2
        dU = xp.zeros((parallel.workers(), 16, C, F), dtype=dout.dtype)  # partial sums, one per worker
        db = xp.zeros((parallel.workers(), F), dtype=dout.dtype)
        dx = xp.empty((N, H, W, C), dtype=dout.dtype) if self.input_grad else None

        def piece(n: slice, t: slice) -> None:
            V = self._winograd_input(x, n, t)
            N_ = n.stop - n.start
            dM = winograd.output_transform_adjoint(
                dout[n], out=scratch("wino_M", (16, V.shape[1], F), dout.dtype, dout),
                work=scratch("wino_work", (4, 2, N_, th, tw, F), dout.dtype, dout))
            i = parallel.slot()
            db[i] += dM[5].sum(axis=0)  # dM at (1, 1) is each tile's sum of its 4 pixels
            dU_q = scratch("wino_dU", (C, F), dout.dtype, dout)
            for q in range(16):
                dU[i, q] += xp.matmul(V[q].T, dM[q], out=dU_q)
            if dx is not None:
                dV = V  # V is spent: its buffer takes dV = dM U^T
                for q in range(16):
                    xp.matmul(dM[q], U[q].T, out=dV[q])
                winograd.input_transform_adjoint(dV, (N_, th, tw), out=dx[n],
                                                 work=scratch("wino_work", (2, 6, N_, th, tw, C), dout.dtype, dout))

        # Whole images only: the input transform's adjoint adds across the borders of tile rows.
        _run_pieces(piece, _pieces(N, th, tw, dout, bands=False), dout)
        self.grads["W"] = winograd.filter_transform_adjoint(dU.sum(axis=0))
        self._set_bias_grad(db)
        return dx


def _pieces(N: int, rows: int, per_row: int, like, bands: bool = True, target: int = 4096) -> list:
    """Cut N images of `rows` rows (of `per_row` pixels or tiles each) into (batch, rows) slice
    pieces of about `target` pixels for the CPU workers, at least two per worker when the work
    allows: whole images, or with `bands` and fewer images than that, bands of one image's rows.
    Off the CPU, or with one worker, a single piece.
    """
    workers = parallel.workers() if isinstance(like, np.ndarray) else 1
    if workers == 1:
        return [(slice(0, N), slice(0, rows))]
    want = max(2 * workers, -(-N * rows * per_row // target))
    if N >= min(want, 2 * workers) or not bands:
        return [(slice(a, b), slice(0, rows)) for a, b in parallel.split(N, want)]
    per_image = -(-want // N)
    return [(slice(n, n + 1), slice(a, b)) for n in range(N) for a, b in parallel.split(rows, per_image)]


def _run_pieces(task, pieces: list, like) -> None:
    """task(batch slice, row slice) for every piece, side by side on the CPU workers (NumPy), or
    on the calling thread (CuPy: one piece)."""
    if isinstance(like, np.ndarray):
        parallel.run(lambda i: task(*pieces[i]), len(pieces))
    else:
        for piece in pieces:
            task(*piece)


def _pixel_rows(a):
    """(n, h, w, c) slice of a fresh contiguous array -> its (n*h*w, c) view, written through."""
    rows = a.reshape(-1, a.shape[-1])
    if rows.size and not array_module(a).may_share_memory(rows, a):  # pragma: no cover - a bug guard
        raise ValueError("piece of an output array is not contiguous")
    return rows


def _weight_grad(cols, dout2d):
    """cols^T @ dout, (K, F): the longer side first, as OpenBLAS is very slow on a tiny K x P @ P x F."""
    if cols.shape[1] >= dout2d.shape[1]:
        return cols.T @ dout2d
    return (dout2d.T @ cols).T


def _conv_multiply_then_shift(x, w, b):
    """'same' conv for few output channels: Y = x @ [W_ij] (k*k*F columns), then out = sum of the
    k*k shifted slices of Y. Reads x once instead of copying it k*k times into a patch matrix.

    x (N, H, W, C), w (k, k, C, F), b (F,) -> (N, H, W, F)
    """
    xp = array_module(x)
    N, H, W, C = x.shape
    k, F, p = w.shape[0], w.shape[-1], w.shape[0] // 2
    w_taps = w.transpose(0, 1, 3, 2).reshape(k * k * F, C)
    out = xp.empty((N, H, W, F), dtype=x.dtype)

    def piece(n: slice, _: slice) -> None:
        N_ = n.stop - n.start
        # Channels-first products (k, k, F, N_, H, W): each tap's shifted slice-add runs along W.
        taps = xp.matmul(w_taps, x[n].reshape(-1, C).T, out=scratch("taps", (k * k * F, N_ * H * W), x.dtype, x))
        y = taps.reshape(k, k, F, N_, H, W)
        acc = scratch("taps_sum", (F, N_, H, W), x.dtype, x)
        xp.add(y[p, p], b.reshape(F, 1, 1, 1), out=acc)
        for i in range(k):
            for j in range(k):
                if i == p and j == p:
                    continue
                dy, dx = i - p, j - p  # out[y, x] += x[y + dy, x + dx] @ W[i, j]
                acc[:, :, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)] += \
                    y[i, j, :, :, max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)]
        xp.copyto(out[n], acc.transpose(1, 2, 3, 0))

    _run_pieces(piece, _pieces(N, H, W, x, bands=False), x)
    return out


# ---------------------------------------------------------------------------------------------
# Resampling: 2x2 max-pool down, x2 nearest-neighbour up, both through strided views.

class MaxPool2d(Layer):
    """2x2 max-pool, stride 2. (N, H, W, C) -> (N, H//2, W//2, C); an odd last row/column is dropped."""

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        H2, W2 = H // 2, W // 2
        out = xp.empty((N, H2, W2, C), dtype=x.dtype)

        def piece(n: slice, y: slice) -> None:  # y: output rows
            rows = x[n, 2 * y.start:2 * y.stop]
            pairs = xp.maximum(rows[:, 0::2], rows[:, 1::2])  # max over each row pair, then column pair
            xp.maximum(pairs[:, :, 0:2 * W2:2], pairs[:, :, 1:2 * W2:2], out=out[n, y])

        _map(piece, N, H2, W, x)
        self.cache = (x, out)
        return out

    def backward(self, dout):
        xp = array_module(dout)
        x, out = self.cache
        N, H, W, C = x.shape
        H2, W2 = out.shape[1:3]
        dx = (xp.zeros if (H % 2 or W % 2) else xp.empty)(x.shape, dtype=dout.dtype)

        # Route each gradient to the first maximum of its window (order (0,0), (0,1), (1,0), (1,1)),
        # as an argmax would: a tied window passes its gradient to one element, not to all.
        def piece(n: slice, y: slice) -> None:
            rows = slice(2 * y.start, 2 * y.stop)
            window_max, d = out[n, y], dout[n, y]
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

        _map(piece, N, H2, W, dout)
        return dx


class Upsample2d(Layer):
    """x2 nearest-neighbour upsampling. (N, H, W, C) -> (N, 2H, 2W, C)."""

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        out = xp.empty((N, 2 * H, 2 * W, C), dtype=x.dtype)

        def piece(n: slice, y: slice) -> None:
            xp.copyto(out[n, 2 * y.start:2 * y.stop].reshape(n.stop - n.start, y.stop - y.start, 2, W, 2, C),
                      x[n, y, None, :, None, :])

        _map(piece, N, H, 4 * W, x)
        return out

    def backward(self, dout):
        xp = array_module(dout)
        N, H2, W2, C = dout.shape
        dx = xp.empty((N, H2 // 2, W2 // 2, C), dtype=dout.dtype)

        def piece(n: slice, y: slice) -> None:  # y: rows of dx
            d = dout[n, 2 * y.start:2 * y.stop]
            pairs = xp.add(d[:, 0::2], d[:, 1::2])  # sum each row pair, then each column pair
            xp.add(pairs[:, :, 0::2], pairs[:, :, 1::2], out=dx[n, y])

        _map(piece, N, H2 // 2, 4 * W2, dout)
        return dx


def _map(task, N: int, rows: int, per_row: int, like) -> None:
    """task(batch slice, row slice) over pieces of N images x `rows` rows, on the CPU workers."""
    _run_pieces(task, _pieces(N, rows, per_row, like, target=1 << 16), like)


def _map_elementwise(task, x) -> None:
    """task(index) over pieces of x's first two axes (N, H, W, C arrays), or once over all of x."""
    if x.ndim == 4:
        _map(lambda n, y: task((n, y)), x.shape[0], x.shape[1], x.shape[2], x)
    else:
        task(Ellipsis)


# ---------------------------------------------------------------------------------------------
# Activations.

class ReLU(Layer):
    """max(x, 0) of any shape; (N, H, W, C) arrays are split over the CPU workers."""

    def forward(self, x):
        xp = array_module(x)
        out = xp.empty_like(x)
        _map_elementwise(lambda part: xp.maximum(x[part], 0, out=out[part]), x)
        self.cache = out
        return out

    def backward(self, dout):
        xp = array_module(dout)
        dx = xp.empty_like(dout)
        _map_elementwise(lambda part: xp.multiply(dout[part], self.cache[part] > 0, out=dx[part]), dout)
        return dx


class Tanh(Layer):
    def forward(self, x):
        xp = array_module(x)
        out = xp.tanh(x)
        self.cache = out
        return out

    def backward(self, dout):
        xp = array_module(dout)
        out = self.cache
        dx = xp.multiply(out, out)
        xp.subtract(1, dx, out=dx)
        dx *= dout
        return dx


# ---------------------------------------------------------------------------------------------
# Normalization and skip connections.

class BatchNorm2d(Layer):
    """Batch normalization over N, H, W for each of C channels (Ioffe & Szegedy, 2015).

    Training: x_hat = (x - mean) / sqrt(var + eps) with the batch's own mean and variance per
    channel, out = gamma * x_hat + beta. Inference (`training = False`): the running averages of
    mean and variance collected in training take their place, so one photo's output does not
    depend on the others in its batch. gamma and beta are parameters (Adam steps them); the
    running statistics are `buffers`, saved with the weights but never stepped.
    When a batch is split over several processes (MPI), `sum_over_batch` adds per-channel sums
    over all of them, so every shard is normalized with the statistics of the whole batch.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.params = {"gamma": np.ones(channels, dtype=dtype), "beta": np.zeros(channels, dtype=dtype)}
        self.grads = {name: None for name in self.params}
        self.buffers = {"running_mean": np.zeros(channels, dtype=dtype),
                        "running_var": np.ones(channels, dtype=dtype)}
        self.training = True
        # Data parallelism: the batch is cut into `shards` equal shards, one per process, and
        # sum_over_batch maps (k, C) sums over this shard to sums over the whole batch.
        self.shards, self.sum_over_batch = 1, None

    def _batch_sums(self, *partial):
        """Per-channel sums (C,) over this shard's pixels -> the same sums over the whole batch."""
        if self.sum_over_batch is None:
            return partial
        return tuple(self.sum_over_batch(array_module(partial[0]).stack(partial)))

    def forward(self, x):
        """x (N, H, W, C) -> (N, H, W, C)."""
        C = x.shape[-1]
        rows = x.reshape(-1, C)  # (P, C): one row per pixel
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not self.training:
            scale = gamma / (self.buffers["running_var"] + self.eps) ** 0.5
            self.cache = ("eval",)
            return (rows * scale + (beta - self.buffers["running_mean"] * scale)).reshape(x.shape)
        P = rows.shape[0] * self.shards  # pixels in the whole batch
        mean = self._batch_sums(rows.sum(axis=0))[0] / P
        x_hat = rows - mean
        var = self._batch_sums((x_hat * x_hat).sum(axis=0))[0] / P  # biased: what the batch is normalized by
        inv_std = 1 / (var + self.eps) ** 0.5
        x_hat *= inv_std
        m = self.momentum  # the running variance is the unbiased estimate, as PyTorch keeps it
        self.buffers["running_mean"] = (1 - m) * self.buffers["running_mean"] + m * mean
        self.buffers["running_var"] = (1 - m) * self.buffers["running_var"] + m * var * (P / max(P - 1, 1))
        self.cache = ("train", x_hat, inv_std, P)
        return (x_hat * gamma + beta).reshape(x.shape)

    def backward(self, dout):
        """dout (N, H, W, C) -> dx (N, H, W, C); fills grads of gamma and beta."""
        if self.cache[0] != "train":
            raise RuntimeError("BatchNorm2d.backward needs a forward pass in training mode")
        _, x_hat, inv_std, P = self.cache
        d = dout.reshape(-1, dout.shape[-1])
        self.grads["beta"] = d.sum(axis=0)
        self.grads["gamma"] = (d * x_hat).sum(axis=0)
        dbeta, dgamma = self._batch_sums(self.grads["beta"], self.grads["gamma"])
        # dx = gamma / std * (d - mean(d) - x_hat * mean(d * x_hat)): the batch mean and variance
        # depend on every input, which gives the two subtracted terms.
        dx = x_hat * (dgamma / P)
        array_module(d).subtract(d, dx, out=dx)
        dx -= dbeta / P
        dx *= self.params["gamma"] * inv_std
        return dx.reshape(dout.shape)


class Concat(Layer):
    """Join two feature maps along channels: (N, H, W, Ca) and (N, H, W, Cb) -> (N, H, W, Ca + Cb).

    The U-Net's skip connection: the decoder's upsampled features beside the encoder's features of
    the same size. Backward splits the gradient back into the two parts.
    """

    def forward(self, a, b):
        xp = array_module(a)
        self.split = a.shape[-1]
        return xp.concatenate([a, b], axis=-1)

    def backward(self, dout):
        """dout (N, H, W, Ca + Cb) -> (da, db)."""
        xp = array_module(dout)
        return (xp.ascontiguousarray(dout[..., :self.split]), xp.ascontiguousarray(dout[..., self.split:]))
