"""Layers of a convolutional network, each with a forward and a backward pass.

Shape legend (channels-last, so a 3x3 conv is one matrix multiply without transposes):
    N, H, W, C = batch, height, width, channels
    F          = output channels (filters) of a conv, k = kernel size
A layer's `forward(x)` caches what its `backward(dout)` needs; `backward` returns dx (never
changing dout in place) and writes parameter gradients into `self.grads`, beside `self.params`.
"""
from __future__ import annotations

import numpy as np

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
# Convolution: im2col + one GEMM forward; backward is two more GEMMs.

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
    """Zero-pad H and W of x (N, H, W, C) by p, into a reused scratch buffer."""
    N, H, W, C = x.shape
    x_pad = scratch(tag, (N, H + 2 * p, W + 2 * p, C), x.dtype, x, zero=True)
    x_pad[:, p:p + H, p:p + W, :] = x
    return x_pad


class Conv2d(Layer):
    """k x k convolution, stride 1, 'same' zero padding, with bias. x (N, H, W, C) -> (N, H, W, F).

    Weights (k, k, C, F) are He-initialized: std sqrt(2 / (k*k*C)), right for ReLU networks.
    dx is computed as a convolution of dout with the flipped kernel (one im2col + one GEMM);
    `dx_method = "col2im"` selects the textbook scatter-add of the column gradients instead.
    """

    dx_method = "transposed_conv"

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

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        k, F = self.k, self.c_out
        x_pad = pad_into(x, k // 2, "pad")
        # The patch matrix is kept for backward (dW needs it): one buffer per layer and shape.
        cols = getattr(self, "_cols", None)
        if cols is None or cols.shape != (N * H * W, k * k * C) or cols.dtype != x.dtype \
                or array_module(cols) is not xp:
            cols = self._cols = xp.empty((N * H * W, k * k * C), dtype=x.dtype)
        im2col(x_pad, k, H, W, out=cols)
        out = cols @ self.params["W"].reshape(k * k * C, F)
        out += self.params["b"]
        self.cache = (cols, x.shape)
        return out.reshape(N, H, W, F)

    def backward(self, dout):
        cols, (N, H, W, C) = self.cache
        k, F = self.k, self.c_out
        dout2d = dout.reshape(N * H * W, F)
        self.grads["W"] = (cols.T @ dout2d).reshape(self.params["W"].shape)
        self.grads["b"] = dout2d.sum(axis=0)
        if not self.input_grad:
            return None
        if self.dx_method == "col2im":
            dcols = dout2d @ self.params["W"].reshape(k * k * C, F).T     # (N*H*W, k*k*C)
            p = k // 2
            return col2im(dcols, (N, H + 2 * p, W + 2 * p, C), k, H, W)[:, p:p + H, p:p + W, :]
        # dx[y, x, c] = sum_{i, j, f} dout_pad[y + i, x + j, f] * W[k-1-i, k-1-j, c, f]
        dout_pad = pad_into(dout, k // 2, "pad")
        dcols = im2col(dout_pad, k, H, W, out=scratch("cols", (N * H * W, k * k * F), dout.dtype, dout))
        w_flipped = self.params["W"][::-1, ::-1].transpose(0, 1, 3, 2).reshape(k * k * F, C)
        return (dcols @ w_flipped).reshape(N, H, W, C)


# ---------------------------------------------------------------------------------------------
# Resampling: 2x2 max-pool down, x2 nearest-neighbour up, both through reshaped views.

class MaxPool2d(Layer):
    """2x2 max-pool, stride 2. (N, H, W, C) -> (N, H//2, W//2, C); an odd last row/column is dropped."""

    def forward(self, x):
        N, H, W, C = x.shape
        H2, W2 = H // 2, W // 2
        windows = x[:, :2 * H2, :2 * W2, :].reshape(N, H2, 2, W2, 2, C)
        out = windows.max(axis=(2, 4))
        self.cache = (windows, out, x.shape)
        return out

    def backward(self, dout):
        xp = array_module(dout)
        windows, out, x_shape = self.cache
        N, H2, _, W2, _, C = windows.shape
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        dwin = dx[:, :2 * H2, :2 * W2, :].reshape(N, H2, 2, W2, 2, C)  # a view into dx
        taken = xp.zeros(out.shape, dtype=bool)
        # Route each gradient to the first maximum of its window, as an argmax would.
        for i in range(2):
            for j in range(2):
                is_max = (windows[:, :, i, :, j, :] == out) & ~taken
                dwin[:, :, i, :, j, :] = xp.where(is_max, dout, 0)
                taken |= is_max
        return dx


class Upsample2d(Layer):
    """x2 nearest-neighbour upsampling. (N, H, W, C) -> (N, 2H, 2W, C)."""

    def forward(self, x):
        xp = array_module(x)
        N, H, W, C = x.shape
        out = xp.broadcast_to(x[:, :, None, :, None, :], (N, H, 2, W, 2, C))
        return out.reshape(N, 2 * H, 2 * W, C)

    def backward(self, dout):
        N, H2, W2, C = dout.shape
        return dout.reshape(N, H2 // 2, 2, W2 // 2, 2, C).sum(axis=(2, 4))


# ---------------------------------------------------------------------------------------------
# Activations.

class ReLU(Layer):
    def forward(self, x):
        xp = array_module(x)
        out = xp.maximum(x, 0)
        self.cache = out
        return out

    def backward(self, dout):
        return dout * (self.cache > 0)


class Tanh(Layer):
    def forward(self, x):
        xp = array_module(x)
        out = xp.tanh(x)
        self.cache = out
        return out

    def backward(self, dout):
        out = self.cache
        return dout * (1 - out * out)
