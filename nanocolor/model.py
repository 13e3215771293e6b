"""The colorization autoencoder: lightness in, chroma out.

Shape legend: N, H, W = batch, height, width; widths = (w0, w1, ..., wd).
    lightness (N, H, W, 1) in [-1, 1]  ->  ab (N, H, W, 2) in [-1, 1]
Encoder: for each width but the last, Conv(k x k) + ReLU + MaxPool (halves H and W); then a
bottleneck Conv + ReLU to the last width. Decoder: for each width back down, Conv + ReLU +
Upsample (doubles H and W); a final Conv to 2 channels + Tanh. H and W must divide by
2**(len(widths) - 1), the network's downsampling factor.
For the classification loss (classify.py) the head is instead a Conv to Q color-bin logits,
(N, H, W, Q), from a 1x1 conv with no activation: ColorNet(..., out_channels=Q, head="logits").
"""
from __future__ import annotations

import os

import numpy as np

from . import backend
from .backend import to_numpy
from .layers import Conv2d, MaxPool2d, ReLU, Tanh, Upsample2d
from .serialize import CorruptFileError, load_npz, save_npz

DEFAULT_WIDTHS = (32, 64, 128, 256)


class ColorNet:
    def __init__(self, widths: tuple = DEFAULT_WIDTHS, kernel: int = 3, seed: int = 0, dtype=np.float32,
                 out_channels: int = 2, head: str = "tanh"):
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        if head not in ("tanh", "logits"):
            raise ValueError(f"head must be 'tanh' (ab regression) or 'logits' (bin classification), got {head!r}")
        self.config = {"widths": [int(w) for w in widths], "kernel": int(kernel),
                       "out_channels": int(out_channels), "head": head}
        rng = np.random.default_rng(seed)
        conv = lambda c_in, c_out: Conv2d(c_in, c_out, kernel, rng=rng, dtype=dtype)
        layers, c = [], 1
        for w in widths[:-1]:
            layers += [conv(c, w), ReLU(), MaxPool2d()]
            c = w
        layers += [conv(c, widths[-1]), ReLU()]
        c = widths[-1]
        for w in reversed(widths[:-1]):
            layers += [conv(c, w), ReLU(), Upsample2d()]
            c = w
        if head == "tanh":
            layers += [conv(c, out_channels), Tanh()]
        else:  # hundreds of bin logits per pixel: a 1x1 conv keeps that head cheap
            layers += [Conv2d(c, out_channels, 1, rng=rng, dtype=dtype)]
        layers[0].input_grad = False  # nobody needs the gradient w.r.t. the input image
        self.layers = layers
        self.to_device()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["widths"]) - 1)

    @property
    def param_layers(self) -> list:
        return [layer for layer in self.layers if layer.params]

    def num_params(self) -> int:
        return sum(int(p.size) for layer in self.param_layers for p in layer.params.values())

    def to_device(self) -> "ColorNet":
        """Move every parameter onto the device chosen in backend.use_device()."""
        for layer in self.param_layers:
            for name, p in layer.params.items():
                layer.params[name] = backend.xp.asarray(p)
        return self

    def forward(self, lightness):
        """(N, H, W, 1) scaled lightness -> (N, H, W, 2) scaled ab (or (N, H, W, Q) bin logits)."""
        N, H, W, _ = lightness.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must divide by the downsampling factor {f}")
        x = lightness
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, d_ab) -> None:
        """Backpropagate dloss/d(ab) (N, H, W, 2); fills every layer's grads."""
        d = d_ab
        for layer in reversed(self.layers):
            d = layer.backward(d)

    # -- saving and loading -------------------------------------------------------------------
    def state_arrays(self, dtype=None) -> dict:
        """Host copies of all parameters, named 'layer<i>.<param>'."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                a = to_numpy(p)
                arrays[f"layer{i}.{name}"] = a.astype(dtype) if dtype else a.copy()
        return arrays

    def load_state_arrays(self, arrays: dict, source: str = "weights") -> None:
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                key = f"layer{i}.{name}"
                if key not in arrays:
                    raise CorruptFileError(f"{source}: missing parameter {key}")
                a = arrays[key]
                if a.shape != p.shape:
                    raise CorruptFileError(f"{source}: {key} has shape {a.shape}, the architecture needs {p.shape}")
                if not np.all(np.isfinite(a)):
                    raise CorruptFileError(f"{source}: {key} holds NaN or infinite values")
                layer.params[name] = backend.xp.asarray(a.astype(p.dtype))

    def save(self, path: str | os.PathLike, dtype=np.float16, **meta) -> None:
        """Write weights + architecture config atomically (float16 by default: half the bytes).

        Weights beyond float16's range (65504) are kept in float32 rather than turned into inf.
        """
        arrays = self.state_arrays()
        if dtype is not None and np.dtype(dtype) == np.float16 and \
                max(float(np.abs(a).max(initial=0)) for a in arrays.values()) > float(np.finfo(np.float16).max):
            dtype = np.float32
        if dtype is not None:
            arrays = {name: a.astype(dtype) for name, a in arrays.items()}
        save_npz(path, arrays, kind="weights", config=self.config, **meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ColorNet":
        """Rebuild a model from a weights file or a training checkpoint alone."""
        arrays, meta = load_npz(path)
        return cls.from_contents(arrays, meta, source=str(path))

    @classmethod
    def from_contents(cls, arrays: dict, meta: dict, source: str, dtype=np.float32) -> "ColorNet":
        """Rebuild a model from the (arrays, meta) of a file already read with serialize.load_npz."""
        config = meta.get("config")
        try:
            model = cls(widths=tuple(config["widths"]), kernel=config["kernel"], dtype=dtype,
                        out_channels=config.get("out_channels", 2), head=config.get("head", "tanh"))
        except (TypeError, KeyError, ValueError):
            raise CorruptFileError(f"{source}: no usable architecture config ({config!r})") from None
        model.load_state_arrays(arrays, source=source)
        return model
