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
# Convolution: im2col + one GEMM forward, two GEMMs + col2im backward.

def im2col(x_pad, k: int, H: int, W: int):
    """(N, H+k-1, W+k-1, C) padded input -> (N*H*W, k*k*C) patch matrix, one copy.

    A strided view lays every k x k patch out without copying; reshape then copies it once,
    row (n, y, x) holding the patch whose top-left corner is pixel (y, x) of the padded input.
    """
    xp = array_module(x_pad)
    N, _, _, C = x_pad.shape
    sN, sH, sW, sC = x_pad.strides
    patches = xp.lib.stride_tricks.as_strided(
        x_pad, shape=(N, H, W, k, k, C), strides=(sN, sH, sW, sH, sW, sC))
    return patches.reshape(N * H * W, k * k * C)


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


class Conv2d(Layer):
    """k x k convolution, stride 1, 'same' zero padding, with bias. x (N, H, W, C) -> (N, H, W, F).

    Weights (k, k, C, F) are He-initialized: std sqrt(2 / (k*k*C)), right for ReLU networks.
    """

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
        p = self.k // 2
        x_pad = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        cols = im2col(x_pad, self.k, H, W)                       # (N*H*W, k*k*C)
        w_mat = self.params["W"].reshape(-1, self.c_out)          # (k*k*C, F)
        out = cols @ w_mat
        out += self.params["b"]
        self.cache = (cols, x_pad.shape)
        return out.reshape(N, H, W, self.c_out)

    def backward(self, dout):
        cols, x_pad_shape = self.cache
        N, H, W, F = dout.shape
        dout2d = dout.reshape(N * H * W, F)
        self.grads["W"] = (cols.T @ dout2d).reshape(self.params["W"].shape)
        self.grads["b"] = dout2d.sum(axis=0)
        if not self.input_grad:
            return None
        dcols = dout2d @ self.params["W"].reshape(-1, F).T       # (N*H*W, k*k*C)
        dx_pad = col2im(dcols, x_pad_shape, self.k, H, W)
        p = self.k // 2
        return dx_pad[:, p:p + H, p:p + W, :]


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
