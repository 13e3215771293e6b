"""Layers of a convolutional network, each with a forward and a backward pass.

Shape legend (channels-last, so a 3x3 conv is one matrix multiply without transposes):
    N, H, W, C = batch, height, width, channels
    F          = output channels (filters) of a conv, k = kernel size, P = N * H * W pixels
A layer's `forward(x)` caches what its `backward(dout)` needs; `backward` returns dx (never
changing dout in place) and writes parameter gradients into `self.grads`, beside `self.params`.
Outputs and gradients are fresh arrays owned by the caller; temporaries live in `scratch`
buffers allocated once per shape, so a training step allocates little besides its results.
"""
from __future__ import annotations

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


def scratch(tag: str, shape: tuple, dtype, like, zero: bool = False):
    """A reusable scratch array, allocated once per (tag, shape, dtype) and shared by all layers.

    Scratch arrays hold temporaries only; a 'pad' buffer is zeroed once and its users write only
    its interior, so its border stays zero across every reuse.
    """
    xp = array_module(like)
    key = (tag, tuple(shape), xp.dtype(dtype).str, xp.__name__)
    buf = _workspace.get(key)
    if buf is None:
        buf = _workspace[key] = (xp.zeros if zero else xp.empty)(shape, dtype=dtype)
    return buf


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


def pad_into(x, p: int, tag: str):
    """Zero-pad H and W of x (N, H, W, C) by p, into a reused scratch buffer.

    The buffer is keyed by p too: with p=1 on a 5x7 image the padded 7x9 shape is the same as
    with p=2 on a 3x5 one, and the first would leave values in the second's zero border.
    """
    N, H, W, C = x.shape
    x_pad = scratch(f"{tag}/{p}", (N, H + 2 * p, W + 2 * p, C), x.dtype, x, zero=True)
    x_pad[:, p:p + H, p:p + W, :] = x
    return x_pad


def patch_matrix(x, k: int, tag: str):
    """im2col of x (N, H, W, C) with 'same' zero padding -> (N*H*W, k*k*C), in a scratch buffer.

    A 1x1 kernel needs no copy: the patch matrix is x itself.
    """
    N, H, W, C = x.shape
    if k == 1:
        return x.reshape(N * H * W, C)
    return im2col(pad_into(x, k // 2, "pad"), k, H, W,
                  out=scratch(tag, (N * H * W, k * k * C), x.dtype, x))


# ---------------------------------------------------------------------------------------------
# Convolution.

class Conv2d(Layer):
    """k x k convolution, stride 1, 'same' zero padding, with bias. x (N, H, W, C) -> (N, H, W, F).

    Weights (k, k, C, F) are He-initialized: std sqrt(2 / (k*k*C)), right for ReLU networks.
    Three ways to compute the same numbers, chosen by `method`:
      "im2col"   the textbook reference: patch matrix + one GEMM forward, kept for backward;
                 dW = cols^T dout; dx as a convolution of dout with the flipped kernel, or with
                 `dx_method = "col2im"` the scatter-add of the column gradients.
      "gemm"     one GEMM per pass and no per-layer patch matrix: backward builds the patch
                 matrix of dout once and gets both dx (dcols W_flipped) and dW (x^T dcols) from
                 it; thin outputs (4F <= C) multiply first and add k*k shifted slices after.
      "winograd" Winograd F(2x2, 3x3) (nanocolor.winograd) for 3x3 kernels on even H and W:
                 2.25x fewer multiplies as 16 GEMMs per pass; other shapes fall back to "gemm".
      "auto"     (default) "winograd" where it applies and both channel counts reach
                 `winograd_min_channels`, on the CPU when BLAS runs one thread per call (the
                 nanocolor.parallel pool hands out the 16 GEMMs); "gemm" otherwise. With
                 OpenBLAS threading each call itself, 16 calls per pass wait 16 times for a
                 descheduled thread when other processes share the cores.
    `dx_method = "col2im"` always selects the textbook path.
    """

    method = "auto"
    dx_method = "transposed_conv"
    auto_winograd = True
    winograd_min_channels = 16

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, rng=None, dtype=np.float32):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("'same' padding needs an odd kernel size")
        rng = rng if rng is not None else np.random.default_rng()
        std = np.sqrt(2.0 / (kernel * kernel * c_in))
        self.k, self.c_in, self.c_out = kernel, c_in, c_out
        self.params = {"W": (rng.standard_normal((kernel, kernel, c_in, c_out)) * std).astype(dtype),
                       "b": np.zeros(c_out, dtype=dtype)}
        self.grads = {name: None for name in self.params}
        self.input_grad = True  # the first layer of a network may skip computing dx

    def path(self, H: int, W: int, on_cpu: bool = True) -> str:
        """The method forward/backward take at image size H x W: 'im2col', 'gemm' or 'winograd'."""
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
        out += self.params["b"]
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
        self.grads["b"] = dout2d.sum(axis=0)
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
        x = xp.ascontiguousarray(x)
        N, H, W, C = x.shape
        k, F, p = self.k, self.c_out, self.k // 2
        w2d, b = self.params["W"].reshape(k * k * C, F), self.params["b"]
        if 4 * F <= C and k > 1 and self.input_grad:
            self.cache = ("gemm", x, None)
            return _conv_multiply_then_shift(x, self.params["W"], b).reshape(N, H, W, F)
        # Without dx, backward needs x's patch matrix for dW: the layer keeps it (a first layer's is small).
        cols = None if k == 1 else self._own_buffer("_cols", (N * H * W, k * k * C), x) \
            if not self.input_grad else scratch("cols", (N * H * W, k * k * C), x.dtype, x)
        out = xp.empty((N * H * W, F), dtype=x.dtype)

        def product(_: int, rows: slice) -> None:
            xp.matmul(x.reshape(-1, C)[rows] if cols is None else cols[rows], w2d, out=out[rows])
            out[rows] += b

        _patch_matrix_then(x, k, cols, product)
        self.cache = ("gemm", x, cols if not self.input_grad else None)
        return out.reshape(N, H, W, F)

    def _backward_gemm(self, dout):
        xp = array_module(dout)
        _, x, cols = self.cache
        N, H, W, C = x.shape
        k, F = self.k, self.c_out
        dout = xp.ascontiguousarray(dout)
        dout2d, x2d = dout.reshape(-1, F), x.reshape(-1, C)
        pieces = _pieces(N, H, isinstance(dout, np.ndarray))
        db = xp.empty((len(pieces), F), dtype=dout.dtype)
        if not self.input_grad:  # dW = cols^T dout, summed over pieces
            dw = xp.empty((len(pieces),) + (cols.shape[1] if cols is not None else C, F), dtype=dout.dtype)

            def weight_grad(i: int) -> None:
                rows = _rows(pieces[i], H, W)
                dw[i] = _weight_grad(x2d[rows] if cols is None else cols[rows], dout2d[rows])
                db[i] = dout2d[rows].sum(axis=0)

            parallel.run(weight_grad, len(pieces))
            self.grads["W"] = dw.sum(axis=0).reshape(self.params["W"].shape)
            self.grads["b"] = db.sum(axis=0)
            return None
        # One patch matrix of dout serves both gradients (dcols[(n,y,x), (i,j,f)] = dout_pad[n, y+i, x+j, f]):
        #   dx = dcols @ W_flipped                       (a convolution with the flipped kernel)
        #   dW[i, j] = (x^T dcols)[:, (k-1-i, k-1-j, :)]   (pixel y + k-1-i of dout_pad is y - (i - k//2))
        dcols = None if k == 1 else scratch("cols", (N * H * W, k * k * F), dout.dtype, dout)
        w_flipped = self._flipped_weights()
        dx = xp.empty((N * H * W, C), dtype=dout.dtype)
        dw = xp.empty((len(pieces), C, k * k * F), dtype=dout.dtype)

        def products(i: int, rows: slice) -> None:
            d = dout2d[rows] if dcols is None else dcols[rows]
            xp.matmul(d, w_flipped, out=dx[rows])
            xp.matmul(x2d[rows].T, d, out=dw[i])
            db[i] = dout2d[rows].sum(axis=0)

        _patch_matrix_then(dout, k, dcols, products, pieces)
        dw_flipped = dw.sum(axis=0).reshape(C, k, k, F)
        self.grads["W"] = xp.ascontiguousarray(dw_flipped[:, ::-1, ::-1].transpose(1, 2, 0, 3))
        self.grads["b"] = db.sum(axis=0)
        return dx.reshape(N, H, W, C)

    # -- "winograd" -----------------------------------------------------------------------------
    def _forward_winograd(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        F, th, tw = self.c_out, H // 2, W // 2
        P, T = N * th * tw, th * tw
        x_pad = scratch("pad/1", (N, H + 2, W + 2, C), x.dtype, x, zero=True)
        V = self._own_buffer("_wino_V", (16, P, C), x)
        rows = scratch("wino_rows", (4, N, th, W + 2, C), x.dtype, x)
        batches = _batch_pieces(N, isinstance(x, np.ndarray))

        def transform_in(i: int) -> None:
            n = batches[i]
            x_pad[n, 1:H + 1, 1:W + 1] = x[n]
            winograd.input_transform(x_pad[n], out=V[:, n.start * T:n.stop * T], work=rows[:, n])

        parallel.run(transform_in, len(batches))
        U = winograd.filter_transform(self.params["W"])
        M = _matmul_stack(V, U, out=scratch("wino_M", (16, P, F), x.dtype, x))
        out = xp.empty((N, H, W, F), dtype=x.dtype)
        work = scratch("wino_S", (2, 4, P, F), x.dtype, x)

        def transform_out(i: int) -> None:
            n = batches[i]
            tiles = slice(n.start * T, n.stop * T)
            M[5, tiles] += self.params["b"]  # position (1, 1) reaches all four pixels of a tile with weight 1
            winograd.output_transform(M[:, tiles], (n.stop - n.start, th, tw), out=out[n], work=work[:, :, tiles])

        parallel.run(transform_out, len(batches))
        self.cache = ("winograd", V, U, x.shape)
        return out

    def _backward_winograd(self, dout):
        xp = array_module(dout)
        _, V, U, (N, H, W, C) = self.cache
        F, th, tw = self.c_out, H // 2, W // 2
        P, T = N * th * tw, th * tw
        batches = _batch_pieces(N, isinstance(dout, np.ndarray))
        dM = scratch("wino_dM", (16, P, F), dout.dtype, dout)
        z = scratch("wino_Z", (2, 2, N, th, tw, F), dout.dtype, dout)

        def transform_dout(i: int) -> None:
            n = batches[i]
            winograd.output_transform_adjoint(dout[n], out=dM[:, n.start * T:n.stop * T], work=z[:, :, n])

        parallel.run(transform_dout, len(batches))
        self.grads["b"] = dM[5].sum(axis=0)  # dM at (1, 1) is each tile's sum of its 4 pixels
        self.grads["W"] = winograd.filter_transform_adjoint(_matmul_stack(V.transpose(0, 2, 1), dM))
        if not self.input_grad:
            return None
        dV = _matmul_stack(dM, U.transpose(0, 2, 1), out=scratch("wino_dV", (16, P, C), dout.dtype, dout))
        dx = xp.empty((N, H, W, C), dtype=dout.dtype)
        work = scratch("wino_rows_dx", (2, 4, N, th, tw, C), dout.dtype, dout)

        def transform_dx(i: int) -> None:
            n = batches[i]
            winograd.input_transform_adjoint(dV[:, n.start * T:n.stop * T], (n.stop - n.start, th, tw),
                                             out=dx[n], work=work[:, :, n])

        parallel.run(transform_dx, len(batches))
        return dx


def _batch_pieces(N: int, on_cpu: bool) -> list:
    """Batch slices that the CPU workers process side by side (one slice off the CPU)."""
    if not on_cpu or parallel.workers() == 1:
        return [slice(0, N)]
    return [slice(a, b) for a, b in parallel.split(N, 2 * parallel.workers())]


def _pieces(N: int, H: int, on_cpu: bool) -> list:
    """(batch slice, row slice) pieces for the workers: whole images, or rows of a single image."""
    if N > 1 or not on_cpu or parallel.workers() == 1:
        return [(n, slice(0, H)) for n in _batch_pieces(N, on_cpu)]
    return [(slice(0, 1), slice(a, b)) for a, b in parallel.split(H, 2 * parallel.workers())]


def _rows(piece: tuple, H: int, W: int) -> slice:
    """The rows of the (N*H*W, ...) pixel matrix that a (batch, rows) piece covers."""
    n, y = piece
    return slice((n.start * H + y.start) * W, ((n.stop - 1) * H + y.stop) * W)


def _patch_matrix_then(x, k: int, cols, product, pieces=None) -> None:
    """Fill `cols` with the 'same'-padded patch matrix of x (N, H, W, C) (skipped when cols is
    None: a 1x1 kernel's patch matrix is x) and call product(i, rows) on each piece i of its
    rows, the pieces side by side on the CPU workers.
    """
    N, H, W, C = x.shape
    p = k // 2
    pieces = pieces if pieces is not None else _pieces(N, H, isinstance(x, np.ndarray))
    x_pad = None if cols is None else scratch(f"pad/{p}", (N, H + 2 * p, W + 2 * p, C), x.dtype, x, zero=True)
    whole_images = all(y == slice(0, H) for _, y in pieces)

    def fill(i: int) -> None:
        n, y = pieces[i]
        x_pad[n, p + y.start:p + y.stop, p:p + W] = x[n, y]

    def piece_work(i: int) -> None:
        n, y = pieces[i]
        if cols is not None:
            if whole_images:  # an image's padding is its own: fill it here, in the same task
                fill(i)
            src = patches(x_pad[n], k, H, W)[:, y]
            cols_view = cols[_rows(pieces[i], H, W)].reshape(src.shape)
            array_module(x).copyto(cols_view, src)
        product(i, _rows(pieces[i], H, W))

    if cols is not None and not whole_images:  # row pieces read their neighbours' padding rows
        parallel.run(fill, len(pieces))
    parallel.run(piece_work, len(pieces))


def _matmul(a, b, out=None):
    """a @ b, rows split over the CPU workers (nanocolor.parallel) for NumPy arrays."""
    if isinstance(a, np.ndarray):
        return parallel.matmul(a, b, out=out)
    return array_module(a).matmul(a, b, out=out)


def _matmul_tn(a, b):
    """a^T @ b for tall a (P, C) and b (P, D): the long shared axis P split over the CPU workers."""
    if not isinstance(a, np.ndarray) or parallel.workers() == 1:
        return a.T @ b
    parts = parallel.split(a.shape[0], 2 * parallel.workers())
    partial = np.empty((len(parts), a.shape[1], b.shape[1]), dtype=np.result_type(a, b))
    parallel.run(lambda i: np.matmul(a[parts[i][0]:parts[i][1]].T, b[parts[i][0]:parts[i][1]], out=partial[i]),
                 len(parts))
    return partial.sum(axis=0)


def _matmul_stack(a, b, out=None):
    """Batched a[i] @ b[i] (Winograd's 16 positions), one position per task on the CPU workers."""
    xp = array_module(a)
    if xp is not np or parallel.workers() == 1:
        return xp.matmul(a, b, out=out)
    if out is None:
        out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=np.result_type(a, b))
    parallel.run(lambda i: np.matmul(a[i], b[i], out=out[i]), a.shape[0])
    return out


def _weight_grad(cols, dout2d):
    """cols^T @ dout, (K, F): the longer side first, as OpenBLAS is very slow on a tiny K x P @ P x F."""
    if cols.shape[1] >= dout2d.shape[1]:
        return cols.T @ dout2d
    return (dout2d.T @ cols).T


def _conv_multiply_then_shift(x, w, b):
    """'same' conv for few output channels: Y = x @ [W_ij] (k*k*F columns), then out = sum of the
    k*k shifted slices of Y. Reads x once instead of copying it k*k times into a patch matrix.

    x (N, H, W, C), w (k, k, C, F), b (F,) -> (N*H*W, F)
    """
    xp = array_module(x)
    N, H, W, C = x.shape
    k, F, p = w.shape[0], w.shape[-1], w.shape[0] // 2
    HW = H * W
    w_taps = w.transpose(0, 1, 3, 2).reshape(k * k * F, C)
    # Channels-first products (k*k*F, N, H, W): each tap's shifted slice-add runs along W.
    taps = xp.empty((k * k * F, N * HW), dtype=x.dtype)
    out_t = xp.empty((F, N * HW), dtype=x.dtype)
    out = xp.empty((N * HW, F), dtype=x.dtype)
    batches = _batch_pieces(N, isinstance(x, np.ndarray))

    def piece(i: int) -> None:
        n = batches[i]
        rows = slice(n.start * HW, n.stop * HW)
        xp.matmul(w_taps, x.reshape(-1, C)[rows].T, out=taps[:, rows])
        y = taps[:, rows].reshape(k, k, F, -1, H, W)
        acc = out_t[:, rows].reshape(F, -1, H, W)
        xp.add(y[p, p], b.reshape(F, 1, 1, 1), out=acc)
        for ti in range(k):
            for tj in range(k):
                if ti == p and tj == p:
                    continue
                dy, dx = ti - p, tj - p  # out[y, x] += x[y + dy, x + dx] @ W[ti, tj]
                acc[:, :, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)] += \
                    y[ti, tj, :, :, max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)]
        xp.copyto(out[rows], out_t[:, rows].T)

    parallel.run(piece, len(batches))
    return out


# ---------------------------------------------------------------------------------------------
# Resampling: 2x2 max-pool down, x2 nearest-neighbour up, both through strided views.

class MaxPool2d(Layer):
    """2x2 max-pool, stride 2. (N, H, W, C) -> (N, H//2, W//2, C); an odd last row/column is dropped."""

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        H2, W2 = H // 2, W // 2
        rows = xp.maximum(x[:, 0:2 * H2:2], x[:, 1:2 * H2:2])   # (N, H2, W, C): max over each row pair
        out = xp.maximum(rows[:, :, 0:2 * W2:2], rows[:, :, 1:2 * W2:2])
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
        corners = [(0, 0), (0, 1), (1, 0)]
        taken = hit = None
        for i, j in corners:
            is_max = xp.equal(x[:, i:2 * H2:2, j:2 * W2:2], out, out=hit)
            if taken is None:
                taken, hit = is_max, xp.empty_like(is_max)
            else:
                xp.greater(is_max, taken, out=is_max)  # a max here and none before: is_max & ~taken
                taken |= is_max
            xp.multiply(dout, is_max, out=dx[:, i:2 * H2:2, j:2 * W2:2])
        xp.logical_not(taken, out=taken)  # no earlier corner held the max: the last one does
        xp.multiply(dout, taken, out=dx[:, 1:2 * H2:2, 1:2 * W2:2])
        return dx


class Upsample2d(Layer):
    """x2 nearest-neighbour upsampling. (N, H, W, C) -> (N, 2H, 2W, C)."""

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        out = xp.empty((N, 2 * H, 2 * W, C), dtype=x.dtype)
        xp.copyto(out.reshape(N, H, 2, W, 2, C), x[:, :, None, :, None, :])
        return out

    def backward(self, dout):
        xp = array_module(dout)
        rows = xp.add(dout[:, 0::2], dout[:, 1::2])    # sum each row pair, then each column pair
        return xp.add(rows[:, :, 0::2], rows[:, :, 1::2])


# ---------------------------------------------------------------------------------------------
# Activations.

class ReLU(Layer):
    def forward(self, x):
        xp = array_module(x)
        out = xp.maximum(x, 0)
        self.cache = out
        return out

    def backward(self, dout):
        xp = array_module(dout)
        return xp.multiply(dout, self.cache > 0)


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
