"""Layers of a convolutional network, each with a forward and a backward pass: the textbook code.

Shape legend (channels-last, so a conv is one matrix multiply without transposes):
    N, H, W, C = batch, height, width, channels of the input
    F          = output channels (filters) of a conv, k = its kernel size, p its padding (k // 2
                 for 'same'), s its stride (1, or 2 to halve the size)
    Ho, Wo     = a conv's output size, (H + 2p - k) // s + 1: H, W for a 'same' conv
    P          = N * Ho * Wo, the number of output pixels: one row per pixel in a patch matrix
A layer's `forward(x)` keeps in `self.cache` what its `backward(dout)` needs; `backward` returns
dx (never changing dout in place) and writes parameter gradients into `self.grads`, beside
`self.params`.

Each layer here is the plain NumPy (or CuPy) reference and knows nothing of speed. The fast
engine in nanocolor/fast computes the same numbers sooner (Winograd, GEMMs split over CPU
threads, reused buffers) from the layers' params and buffers alone; nanocolor/engine.py picks
which one runs.
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
# Convolution as one matrix multiply: im2col, and its adjoint col2im.

def conv_output_size(size: int, k: int, stride: int = 1, padding: int = 0) -> int:
    """Output rows (or columns) of a k x k convolution over `size` input rows: the patches that fit
    in the padded input, one every `stride` rows. (size + 2p - k) // stride + 1."""
    return (size + 2 * padding - k) // stride + 1


def im2col(x_pad, k: int, stride: int = 1):
    """(N, H_pad, W_pad, C) padded input -> (P, k*k*C) patch matrix, P = N*Ho*Wo with
    Ho = (H_pad - k) // stride + 1 (and Wo likewise): with stride 1, Ho = H_pad - k + 1.

    Row (n, y, x) holds the k x k patch whose top-left corner is pixel (stride*y, stride*x) of
    x_pad, in the order (i, j, c) of the weights (k, k, C, F). A strided view lists every patch
    without copying (neighbouring patches share memory); the reshape makes the one copy.
    """
    xp = array_module(x_pad)
    N, H_pad, W_pad, C = x_pad.shape
    Ho, Wo = conv_output_size(H_pad, k, stride), conv_output_size(W_pad, k, stride)
    sN, sH, sW, sC = x_pad.strides
    # Stepping i rows down inside a patch is one row's stride; stepping to the next patch is `stride` rows.
    patches = xp.lib.stride_tricks.as_strided(x_pad, shape=(N, Ho, Wo, k, k, C),
                                              strides=(sN, stride * sH, stride * sW, sH, sW, sC))
    return patches.reshape(N * Ho * Wo, k * k * C)


def col2im(dcols, x_pad_shape: tuple, k: int, stride: int = 1):
    """Adjoint of im2col: (P, k*k*C) -> (N, H_pad, W_pad, C), every patch's gradient added back
    where the patch came from (a pixel in several patches collects all their gradients; a pixel
    in none, past the last patch of a strided conv, gets zero)."""
    xp = array_module(dcols)
    N, H_pad, W_pad, C = x_pad_shape
    Ho, Wo = conv_output_size(H_pad, k, stride), conv_output_size(W_pad, k, stride)
    dpatches = dcols.reshape(N, Ho, Wo, k, k, C)
    dx_pad = xp.zeros(x_pad_shape, dtype=dcols.dtype)
    rows, cols = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1  # from a patch's first pixel to the last patch's
    for i in range(k):  # one shifted (strided) slice-add per kernel offset, never a loop over pixels
        for j in range(k):
            dx_pad[:, i:i + rows:stride, j:j + cols:stride] += dpatches[:, :, :, i, j]
    return dx_pad


class Conv2d(Layer):
    """k x k convolution with bias: x (N, H, W, C) -> (N, Ho, Wo, F).

        out[n, y, x, f] = b[f] + sum over i, j, c of x_pad[n, s*y + i, s*x + j, c] * W[i, j, c, f]

    x_pad is x with p rows and columns of zeros around it, s the stride, and
    Ho = (H + 2p - k) // s + 1 (conv_output_size). By default s = 1 and p = k // 2 for an odd k:
    'same' padding, Ho, Wo = H, W, the convs of the colorization network. The GAN's critic halves
    the size with s = 2 (k = 3, p = 1, so Ho = H // 2 for an even H).

    Forward: im2col lays every k x k patch out as a row, so the conv is one matrix multiply,
    cols (P, k*k*C) @ W (k*k*C, F). Backward: dW = cols^T dout, db = dout summed over pixels,
    dx = col2im(dout W^T). Weights (k, k, C, F) are He-initialized, std sqrt(2 / (k*k*C)), right
    for ReLU networks. `bias=False` for a conv followed by BatchNorm, which subtracts any
    constant again; `input_grad = False` skips dx (the first layer of a network needs none).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, rng=None, dtype=np.float32, bias: bool = True,
                 stride: int = 1, padding: int | None = None):
        super().__init__()
        if padding is None and kernel % 2 != 1:
            raise ValueError("'same' padding needs an odd kernel size (or give the padding)")
        if stride < 1 or (padding is not None and padding < 0):
            raise ValueError(f"stride must be at least 1 and padding at least 0, got {stride} and {padding}")
        rng = rng if rng is not None else np.random.default_rng()
        std = np.sqrt(2.0 / (kernel * kernel * c_in))
        self.k, self.c_in, self.c_out = kernel, c_in, c_out
        self.stride, self.padding = stride, kernel // 2 if padding is None else padding
        self.params = {"W": (rng.standard_normal((kernel, kernel, c_in, c_out)) * std).astype(dtype)}
        if bias:
            self.params["b"] = np.zeros(c_out, dtype=dtype)
        self.grads = {name: None for name in self.params}
        self.input_grad = True

    @property
    def same(self) -> bool:
        """Stride 1 and 'same' padding: the output has the input's size."""
        return self.stride == 1 and self.k % 2 == 1 and self.padding == self.k // 2

    @property
    def bias(self):
        """(F,) the bias, zeros for a conv without one."""
        w = self.params["W"]
        return self.params["b"] if "b" in self.params else array_module(w).zeros(self.c_out, dtype=w.dtype)

    def forward(self, x):
        """x (N, H, W, C) -> (N, Ho, Wo, F)."""
        w = self.params["W"]
        xp = array_module(x)
        N, H, W, C = x.shape
        k, F, p, s = self.k, self.c_out, self.padding, self.stride
        Ho, Wo = conv_output_size(H, k, s, p), conv_output_size(W, k, s, p)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"a {k}x{k} conv with padding {p} needs an input of at least {k - 2 * p} pixels, got {H}x{W}")
        x_pad = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # (N, H+2p, W+2p, C), zeros around
        cols = im2col(x_pad, k, s)                            # (P, k*k*C), P = N*Ho*Wo
        out = cols @ w.reshape(k * k * C, F) + self.bias      # (P, F)
        self.cache = (x.shape, cols)                          # dW needs the patches again
        return out.reshape(N, Ho, Wo, F)

    def backward(self, dout):
        """dout (N, Ho, Wo, F) -> dx (N, H, W, C), or None when `input_grad` is off; fills grads."""
        (N, H, W, C), cols = self.cache
        k, F, p, s = self.k, self.c_out, self.padding, self.stride
        dout2d = dout.reshape(-1, F)                          # (P, F)
        dw = cols.T @ dout2d                                  # (k*k*C, F): each weight meets every patch
        self.grads["W"] = dw.reshape(k, k, C, F)
        if "b" in self.params:
            self.grads["b"] = dout2d.sum(axis=0)
        if not self.input_grad:
            return None
        dcols = dout2d @ self.params["W"].reshape(k * k * C, F).T  # (P, k*k*C): d loss / d each patch entry
        dx_pad = col2im(dcols, (N, H + 2 * p, W + 2 * p, C), k, s)  # (N, H+2p, W+2p, C)
        return dx_pad[:, p:p + H, p:p + W]                          # the padding is no input


# ---------------------------------------------------------------------------------------------
# Resampling: 2x2 max-pool down, x2 nearest-neighbour up.

class MaxPool2d(Layer):
    """2x2 max-pool, stride 2: x (N, H, W, C) -> (N, H//2, W//2, C); an odd last row/column is dropped.

    Backward routes each window's gradient to the element that won its max (the first in the
    order (0,0), (0,1), (1,0), (1,1) when several tie, as argmax picks it); the rest get zero.
    """

    def forward(self, x):
        """x (N, H, W, C) -> (N, H//2, W//2, C)."""
        N, H, W, C = x.shape
        H2, W2 = H // 2, W // 2
        windows = x[:, :2 * H2, :2 * W2].reshape(N, H2, 2, W2, 2, C)
        windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(N, H2, W2, C, 4)  # each window's 4 values last
        self.cache = (x.shape, windows.argmax(axis=-1))                       # winner (N, H2, W2, C): 0..3
        return windows.max(axis=-1)

    def backward(self, dout):
        """dout (N, H//2, W//2, C) -> dx (N, H, W, C)."""
        xp = array_module(dout)
        (N, H, W, C), winner = self.cache
        H2, W2 = H // 2, W // 2
        dwindows = (winner[..., None] == xp.arange(4)) * dout[..., None]  # (N, H2, W2, C, 4): the winner's only
        dx = xp.zeros((N, H, W, C), dtype=dout.dtype)
        dx[:, :2 * H2, :2 * W2] = dwindows.reshape(N, H2, W2, C, 2, 2).transpose(0, 1, 4, 2, 5, 3) \
                                          .reshape(N, 2 * H2, 2 * W2, C)
        return dx


class Upsample2d(Layer):
    """x2 nearest-neighbour upsampling: x (N, H, W, C) -> (N, 2H, 2W, C), each pixel a 2x2 block."""

    def forward(self, x):
        """x (N, H, W, C) -> (N, 2H, 2W, C)."""
        return x.repeat(2, axis=1).repeat(2, axis=2)

    def backward(self, dout):
        """dout (N, 2H, 2W, C) -> dx (N, H, W, C): the sum of the gradients of each pixel's 4 copies."""
        N, H2, W2, C = dout.shape
        return dout.reshape(N, H2 // 2, 2, W2 // 2, 2, C).sum(axis=(2, 4))


# ---------------------------------------------------------------------------------------------
# Activations.

class ReLU(Layer):
    """max(x, 0), elementwise, any shape."""

    def forward(self, x):
        out = array_module(x).maximum(x, 0)
        self.cache = out
        return out

    def backward(self, dout):
        """The gradient passes where the output was positive."""
        return dout * (self.cache > 0)


class LeakyReLU(Layer):
    """x where x > 0, slope * x elsewhere (slope 0.2, as in pix2pix's critic); any shape.

    Unlike ReLU, a negative input still passes a little gradient, so a critic's units never
    go silent for good.
    """

    def __init__(self, slope: float = 0.2):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        positive = x > 0
        self.cache = positive
        return array_module(x).where(positive, x, self.slope * x)

    def backward(self, dout):
        """d out / dx = 1 where x > 0, else slope."""
        return array_module(dout).where(self.cache, dout, self.slope * dout)


class Tanh(Layer):
    """tanh(x), elementwise, any shape; squashes the network's output into [-1, 1]."""

    def forward(self, x):
        out = array_module(x).tanh(x)
        self.cache = out
        return out

    def backward(self, dout):
        """d tanh(x) / dx = 1 - tanh(x)^2."""
        out = self.cache
        return (1 - out * out) * dout


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
            self.cache = None
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
        self.cache = (x_hat, inv_std, P)
        return (x_hat * gamma + beta).reshape(x.shape)

    def backward(self, dout):
        """dout (N, H, W, C) -> dx (N, H, W, C); fills grads of gamma and beta."""
        if self.cache is None:
            raise RuntimeError("BatchNorm2d.backward needs a forward pass in training mode")
        x_hat, inv_std, P = self.cache
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
        self.split = a.shape[-1]
        return array_module(a).concatenate([a, b], axis=-1)

    def backward(self, dout):
        """dout (N, H, W, Ca + Cb) -> (da, db)."""
        xp = array_module(dout)
        return (xp.ascontiguousarray(dout[..., :self.split]), xp.ascontiguousarray(dout[..., self.split:]))


# ---------------------------------------------------------------------------------------------
# Whole-photo layers: what a photo shows, whatever its size.

class GlobalAvgPool2d(Layer):
    """The mean of each channel over the whole map: (N, H, W, C) -> (N, C)."""

    def forward(self, x):
        self.cache = x.shape
        return x.mean(axis=(1, 2))

    def backward(self, dout):
        """dout (N, C) -> dx (N, H, W, C): every pixel of a channel gets 1 / (H W) of its gradient."""
        _, H, W, _ = self.cache
        xp = array_module(dout)
        return xp.ascontiguousarray(xp.broadcast_to((dout / (H * W))[:, None, None, :], self.cache))


class Linear(Layer):
    """Fully connected: x (N, F) -> x @ W + b (N, K), W (F, K), b (K,)."""

    def __init__(self, f_in: int, f_out: int, rng=None, dtype=np.float32):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.params = {"W": (rng.standard_normal((f_in, f_out)) * np.sqrt(1.0 / f_in)).astype(dtype),
                       "b": np.zeros(f_out, dtype=dtype)}
        self.grads = {"W": None, "b": None}

    def forward(self, x):
        self.cache = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout):
        """dout (N, K) -> dx (N, F); dW = x^T dout, db = the sum of dout over the batch."""
        x = self.cache
        self.grads["W"] = x.T @ dout
        self.grads["b"] = dout.sum(axis=0)
        return dout @ self.params["W"].T
