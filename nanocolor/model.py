"""The colorization networks: lightness in, chroma out.

Shape legend: N, H, W = batch, height, width; widths = (w0, w1, ..., wd).
    lightness (N, H, W, 1) in [-1, 1]  ->  ab (N, H, W, 2) in [-1, 1]
Two architectures, picked by `arch`:
  "seed"  the plain autoencoder. Encoder: for each width but the last, Conv(k x k) + ReLU +
          MaxPool (halves H and W); a bottleneck Conv + ReLU to the last width. Decoder: for
          each width back down, Conv + ReLU + Upsample (doubles H and W); a final Conv to 2
          channels + Tanh.
  "unet"  the same levels with BatchNorm after every hidden conv (Conv + BatchNorm + ReLU) and
          skip connections: after each Upsample the decoder concatenates the encoder's feature
          map of that size (taken before its MaxPool), so the next conv sees the edges where
          colors must stop. Level i of the decoder thus reads 2 * w_i channels.
H and W must divide by 2**(len(widths) - 1), the network's downsampling factor.
For the classification loss (classify.py) the head is instead a Conv to Q color-bin logits,
(N, H, W, Q), from a 1x1 conv with no activation: ColorNet(..., out_channels=Q, head="logits").
A regression net can also carry a class head beside its a*b* head (`class_bins=Q`, fitted by
classhead.py): a Conv from the same map to Q bin logits, the output then (N, H, W, 2 + Q), the
a*b* first; colorizing blends the a*b* with the annealed mean of the bins (infer.py).
A net may also carry a kind head (KindHead, fitted by kindhead.py): what kind of photo it is
colorizing (faces, rooms, forests...), read from its encoder, and so how much color to give it.
"""
from __future__ import annotations

import os

import numpy as np

from . import backend
from .backend import to_numpy
from .layers import BatchNorm2d, Concat, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, ReLU, Tanh, Upsample2d
from .serialize import CorruptFileError, load_npz, save_npz

DEFAULT_WIDTHS = (32, 64, 128, 256)
ARCHS = ("seed", "unet")
DEFAULT_ARCH = "unet"  # what a new model is, in every command and in TrainConfig
# What a config written before a key existed meant: old weight files load with these.
CONFIG_DEFAULTS = {"arch": "seed", "kernel": 3, "out_channels": 2, "head": "tanh", "class_bins": 0}
# How a class head's bins become a*b* when colorizing, unless the weights file says otherwise.
DECODE_DEFAULTS = {"temperature": 0.5, "regression_weight": 0.5}


def full_config(config: dict) -> dict:
    """A stored architecture config with the keys it predates filled in."""
    return {**CONFIG_DEFAULTS, **config}


class Module:
    """A network as the list of its layers, `self.layers`, in forward order: what every network
    (ColorNet here, the critic in gan.py) does with its parameters, whatever its forward pass."""

    layers: list

    @property
    def param_layers(self) -> list:
        return [layer for layer in self.layers if layer.params]

    def num_params(self) -> int:
        return sum(int(p.size) for layer in self.param_layers for p in layer.params.values())

    def to_device(self) -> "Module":
        """Move every parameter (and BatchNorm statistic) onto the device chosen in backend.use_device()."""
        for layer in self.param_layers:
            for store in _stores(layer):
                for name, p in store.items():
                    store[name] = backend.xp.asarray(p)
        return self

    def state_arrays(self, dtype=None, prefix: str = "") -> dict:
        """Host copies of all parameters and BatchNorm statistics, named '<prefix>layer<i>.<name>'."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for store in _stores(layer):
                for name, p in store.items():
                    a = to_numpy(p)
                    arrays[f"{prefix}layer{i}.{name}"] = a.astype(dtype) if dtype else a.copy()
        return arrays

    def load_state_arrays(self, arrays: dict, source: str = "weights", prefix: str = "") -> None:
        """Copy the arrays named as state_arrays names them into the layers (CorruptFileError for a
        missing one, a wrong shape or a non-finite value)."""
        for i, layer in enumerate(self.layers):
            for store in _stores(layer):
                for name, p in store.items():
                    key = f"{prefix}layer{i}.{name}"
                    if key not in arrays:
                        raise CorruptFileError(f"{source}: missing parameter {key}")
                    a = arrays[key]
                    if a.shape != p.shape:
                        raise CorruptFileError(f"{source}: {key} has shape {a.shape}, the architecture needs {p.shape}")
                    if not np.all(np.isfinite(a)):
                        raise CorruptFileError(f"{source}: {key} holds NaN or infinite values")
                    store[name] = backend.xp.asarray(a.astype(p.dtype))


class KindHead(Module):
    """What kind of photo a net colorizes (say faces, rooms, forests), and the chroma gain for it.

    It reads every encoder level's map (before its pool) and the bottleneck's, [(N, Hi, Wi, wi)],
    each averaged over the photo (GlobalAvgPool2d) and joined: (N, w0 + ... + wd); a Linear
    gives one logit per kind. Each kind has a gain; a photo's gain is their mean weighed by the
    softmax of its logits, a factor on the net's chroma_gain. Fitted on fixed features by
    kindhead.py: the rest of the net does not change.
    """

    def __init__(self, widths: tuple, kinds: list, gains: list | None = None, seed: int = 0, dtype=np.float32):
        self.kinds = [str(k) for k in kinds]
        self.gains = [1.0] * len(self.kinds) if gains is None else [float(g) for g in gains]
        if len(self.kinds) < 2 or len(self.gains) != len(self.kinds):
            raise ValueError(f"a kind head needs at least two kinds and one gain for each, got {kinds} and {gains}")
        self.pools = [GlobalAvgPool2d() for _ in widths]
        self.linear = Linear(sum(int(w) for w in widths), len(self.kinds), rng=np.random.default_rng(seed),
                             dtype=dtype)
        self.layers = [*self.pools, self.linear]

    def pooled(self, maps: list):
        """The encoder's maps -> (N, w0 + ... + wd): the mean of every channel."""
        return backend.xp.concatenate([pool.forward(m) for pool, m in zip(self.pools, maps)], axis=-1)

    def probabilities(self, maps: list):
        """The encoder's maps -> (N, K): how likely each kind is."""
        logits = self.linear.forward(self.pooled(maps))
        e = backend.xp.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def photo_gains(self, maps: list):
        """The encoder's maps -> (N,): each photo's gain, the kinds' gains weighed by their probabilities."""
        return self.probabilities(maps) @ backend.xp.asarray(self.gains, dtype=self.linear.params["W"].dtype)


class ColorNet(Module):
    def __init__(self, widths: tuple = DEFAULT_WIDTHS, kernel: int = 3, seed: int = 0, dtype=np.float32,
                 out_channels: int = 2, head: str = "tanh", arch: str = DEFAULT_ARCH, class_bins: int = 0):
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        if head not in ("tanh", "logits"):
            raise ValueError(f"head must be 'tanh' (ab regression) or 'logits' (bin classification), got {head!r}")
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if class_bins and (head != "tanh" or len(widths) < 2):
            raise ValueError("a class head sits beside the a*b* (tanh) head of a net with at least two levels")
        self.config = {"arch": arch, "widths": [int(w) for w in widths], "kernel": int(kernel),
                       "out_channels": int(out_channels), "head": head}
        if class_bins:  # only then: the configs of files without a class head stay as they were
            self.config["class_bins"] = int(class_bins)
        rng = np.random.default_rng(seed)
        conv = lambda c_in, c_out, bias=True: Conv2d(c_in, c_out, kernel, rng=rng, dtype=dtype, bias=bias)
        unet = arch == "unet"

        def block(c_in: int, c_out: int) -> list:
            """Conv + ReLU, with BatchNorm between them (and no conv bias) in the U-Net."""
            if unet:
                return [conv(c_in, c_out, bias=False), BatchNorm2d(c_out, dtype=dtype), ReLU()]
            return [conv(c_in, c_out), ReLU()]

        self.down, self.up = [], []  # (block, MaxPool2d) per encoder level; (block, Upsample2d, Concat | None) per decoder level
        c = 1
        for w in widths[:-1]:
            self.down.append((block(c, w), MaxPool2d()))
            c = w
        self.bottleneck = block(c, widths[-1])
        c = widths[-1]
        for w in reversed(widths[:-1]):
            self.up.append((block(c, w), Upsample2d(), Concat() if unet else None))
            c = 2 * w if unet else w
        if head == "tanh":
            self.head = [conv(c, out_channels), Tanh()]
        else:  # hundreds of bin logits per pixel: a 1x1 conv keeps that head cheap
            self.head = [Conv2d(c, out_channels, 1, rng=rng, dtype=dtype)]
        # The class head reads the map the a*b* head reads; its logits join the a*b* as channels 2:
        self.class_head, self.join = (conv(c, class_bins), Concat()) if class_bins else (None, None)
        # Every layer once, in forward order: parameter names in files are 'layer<i>.<name>'.
        self.layers = [layer for b, pool in self.down for layer in (*b, pool)] + self.bottleneck + \
            [layer for b, up, cat in self.up for layer in (*b, up, *([cat] if cat else []))] + self.head + \
            ([self.class_head, self.join] if class_bins else [])
        self.layers[0].input_grad = False  # nobody needs the gradient w.r.t. the input image
        # Colorizing multiplies the predicted a*b* by this: MSE predicts the mean of the plausible
        # colors, which is duller than any of them; a gain above 1, chosen on validation photos,
        # trades a little PSNR for color (saved with the weights; 1 leaves the prediction as is).
        self.chroma_gain = 1.0
        # With a class head: a*b* = w * regression + (1 - w) * annealed mean of the bins at T.
        self.decode = dict(DECODE_DEFAULTS)
        self.kind_head: KindHead | None = None  # a factor on chroma_gain for each kind of photo
        self.encoded: list = []  # the encoder's maps of the last pass (encode)
        self.eval()
        self.to_device()

    def to_device(self) -> "ColorNet":
        super().to_device()
        if self.kind_head is not None:
            self.kind_head.to_device()
        return self

    def train(self) -> "ColorNet":
        """Training mode: forward keeps what backward needs; BatchNorm normalizes with each
        batch's statistics and updates its running ones."""
        self.training = True
        for layer in self.layers:
            if isinstance(layer, BatchNorm2d):
                layer.training = True
        return self

    def eval(self) -> "ColorNet":
        """Inference mode (the default): BatchNorm uses its running statistics, and `backward`
        refuses to run."""
        self.training = False
        for layer in self.layers:
            if isinstance(layer, BatchNorm2d):
                layer.training = False
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["widths"]) - 1)

    def forward(self, lightness):
        """(N, H, W, 1) scaled lightness -> (N, H, W, 2) scaled ab (or (N, H, W, Q) bin logits; with
        a class head (N, H, W, 2 + Q): the ab, then the logits)."""
        features = self.features(lightness)
        x = features
        for layer in self.head:
            x = layer.forward(x)
        if self.class_head is not None:
            x = self.join.forward(x, self.class_head.forward(features))
        return x

    __call__ = forward

    def encode(self, lightness) -> tuple:
        """(N, H, W, 1) scaled lightness -> (the bottleneck's map, [each encoder level's map before
        its pool]): the encoder and the bottleneck. Kept as self.encoded, [*those maps, the
        bottleneck's], for a kind head to read after this model's forward (the fast engine's
        runner keeps its own `encoded`)."""
        self.check_size(lightness.shape)
        x, skips = lightness, []
        for block, pool in self.down:
            for layer in block:
                x = layer.forward(x)
            skips.append(x)  # the U-Net's decoder reads it again at this size
            x = pool.forward(x)
        for layer in self.bottleneck:
            x = layer.forward(x)
        self.encoded = [*skips, x]
        return x, skips

    def photo_gains(self, lightness):
        """(N, H, W, 1) scaled lightness -> (N,): the factor on chroma_gain for each photo, from
        the kind head (ones without one)."""
        if self.kind_head is None:
            return backend.xp.ones(len(lightness), dtype=self.layers[0].params["W"].dtype)
        self.encode(lightness)
        return self.kind_head.photo_gains(self.encoded)

    def features(self, lightness):
        """(N, H, W, 1) scaled lightness -> (N, H, W, C): the map the head reads (the encoder,
        the bottleneck and the decoder: all but the head)."""
        x, skips = self.encode(lightness)
        for (block, up, cat), skip in zip(self.up, reversed(skips)):
            for layer in block:
                x = layer.forward(x)
            x = up.forward(x)
            if cat:
                x = cat.forward(x, skip)
        return x

    def backward(self, d_ab) -> None:
        """Backpropagate dloss/d(output) (N, H, W, 2), or (N, H, W, 2 + Q) with a class head,
        through the last forward pass, which ran in training mode (`train()`); fills every
        layer's grads. The forward's loops, reversed."""
        if not self.training:
            raise RuntimeError("backward needs a forward pass in training mode: call model.train() first "
                               "(in eval mode forward keeps nothing for a backward)")
        d, d_skips, d_class = d_ab, [], None
        if self.class_head is not None:
            d, d_logits = self.join.backward(d)
            d_class = self.class_head.backward(d_logits)
        for layer in reversed(self.head):
            d = layer.backward(d)
        if d_class is not None:  # the map fed both heads: their gradients add
            d = d + d_class
        for block, up, cat in reversed(self.up):
            if cat:
                d, d_skip = cat.backward(d)
                d_skips.append(d_skip)
            d = up.backward(d)
            for layer in reversed(block):
                d = layer.backward(d)
        for layer in reversed(self.bottleneck):
            d = layer.backward(d)
        for block, pool in reversed(self.down):
            d = pool.backward(d)
            if d_skips:  # the encoder's map fed both the pool and the skip: their gradients add
                d = d + d_skips.pop()
            for layer in reversed(block):
                d = layer.backward(d)

    def check_size(self, shape: tuple) -> None:
        """ValueError unless an input of `shape` (N, H, W, 1) has sides that divide by the downsampling factor."""
        H, W, f = shape[1], shape[2], self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must divide by the downsampling factor {f}")

    def _fresh(self, seed: int, **changes) -> "ColorNet":
        """A freshly initialized net of this one's architecture and dtype, with `changes` to its config."""
        return ColorNet(**{**self.config, **changes}, seed=seed, dtype=self.layers[0].params["W"].dtype)

    def deepened(self, width: int, seed: int = 0) -> "ColorNet":
        """This U-Net one level deeper, widths + (width,), computing exactly what this one computes.

        Transfer learning for context: each level doubles the receptive field of what lies below
        it. This net's bottleneck becomes the new last encoder level; the new bottleneck and the
        decoder level above it start fresh (He init, `seed`). The decoder conv that read the old
        bottleneck now reads [new level's output, old bottleneck's output] concatenated: its
        weights on the new part start at zero, so the deepened net predicts what this one did,
        and fine-tuning grows the new level from there instead of from scratch.
        """
        if self.config["arch"] != "unet":
            raise ValueError("only a U-Net can grow a level without changing what it computes "
                             f"(its skip connection carries the old path); this net is {self.config['arch']!r}")
        deep = self._fresh(seed, widths=(*self.config["widths"], width))
        pairs = [(old, new) for (old_block, _), (new_block, _) in zip(self.down, deep.down)
                 for old, new in zip(old_block, new_block)]
        pairs += zip(self.bottleneck, deep.down[-1][0])
        pairs += [(old, new) for (old_block, _, _), (new_block, _, _) in zip(self.up, deep.up[1:])
                  for old, new in zip(old_block, new_block)]
        pairs += zip(self.head, deep.head)
        if self.class_head is not None:
            pairs.append((self.class_head, deep.class_head))
        for old, new in pairs:
            for old_store, new_store in zip(_stores(old), _stores(new)):
                for name, p in old_store.items():
                    p = to_numpy(p)
                    if new_store[name].shape != p.shape:  # the conv that also reads the new level: zeros there
                        grown = np.zeros(new_store[name].shape, dtype=p.dtype)
                        grown[:, :, -p.shape[2]:] = p  # the skip (old bottleneck) is the second part of the concat
                        p = grown
                    new_store[name] = p.copy()
        deep.chroma_gain, deep.decode = self.chroma_gain, dict(self.decode)
        return deep.to_device()

    def widened(self, widths: tuple, seed: int = 0) -> "ColorNet":
        """This net with more channels per level (`widths`, each >= this net's), computing exactly
        what this one computes.

        Transfer learning for capacity: every conv keeps its weights on the old channels; the new
        output channels start fresh (He init, `seed`) and the weights that read them start at
        zero, so nothing downstream sees them until training moves those zeros (their gradient
        is not zero: it is the new channels' activations times the output's gradient).
        """
        old_widths, widths = self.config["widths"], [int(w) for w in widths]
        if len(widths) != len(old_widths) or any(new < old for new, old in zip(widths, old_widths)):
            raise ValueError(f"widened widths {widths} must have one entry per level, each at least {old_widths}")
        wide = self._fresh(seed, widths=widths)
        levels, unet = len(widths), self.config["arch"] == "unet"
        # Each block's conv: the levels whose outputs it reads, concatenated (None: the lightness);
        # its old output channels come first among its new ones.
        reads = [[i - 1 if i else None] for i in range(levels)]  # the encoder, then the bottleneck
        reads += [[levels - 1]] + [[levels - 1 - j] * (2 if unet else 1) for j in range(1, levels - 1)]
        head_reads = [0] * (2 if unet and levels > 1 else 1)
        blocks = [b for b, _ in self.down] + [self.bottleneck] + [b for b, _, _ in self.up]
        wide_blocks = [b for b, _ in wide.down] + [wide.bottleneck] + [b for b, _, _ in wide.up]
        convs = [(old[0], new[0], read, old[1:], new[1:]) for old, new, read in zip(blocks, wide_blocks, reads)]
        convs.append((self.head[0], wide.head[0], head_reads, [], []))
        if self.class_head is not None:
            convs.append((self.class_head, wide.class_head, head_reads, [], []))

        def old_channels(read: list) -> np.ndarray:
            """Where the old input channels sit among the widened conv's inputs."""
            spans, start = [], 0
            for level in read:
                old, new = (1, 1) if level is None else (old_widths[level], widths[level])
                spans.append(start + np.arange(old))
                start += new
            return np.concatenate(spans)

        for old, new, read, old_rest, new_rest in convs:
            kept = old_channels(read)
            W = np.array(to_numpy(new.params["W"]))
            W[:, :, np.setdiff1d(np.arange(W.shape[2]), kept)] = 0  # nothing reads the new channels yet
            W[:, :, kept, :old.c_out] = to_numpy(old.params["W"])
            new.params["W"] = W
            if "b" in old.params:
                new.params["b"] = np.array(to_numpy(new.params["b"]))
                new.params["b"][:old.c_out] = to_numpy(old.params["b"])
            for old_layer, new_layer in zip(old_rest, new_rest):  # BatchNorm: its old channels as they were
                for old_store, new_store in zip(_stores(old_layer), _stores(new_layer)):
                    for name, p in old_store.items():
                        new_store[name] = np.array(to_numpy(new_store[name]))
                        new_store[name][:len(p)] = to_numpy(p)
        wide.chroma_gain, wide.decode = self.chroma_gain, dict(self.decode)
        return wide.to_device()

    def with_class_head(self, bins: int, seed: int = 0) -> "ColorNet":
        """This regression net with a fresh class head of `bins` logits beside its a*b* head
        (replacing any it had): every other parameter is copied, so the a*b* stay as they were."""
        hybrid = self._fresh(seed, class_bins=bins)
        own = self.state_arrays()
        if self.class_head is not None:
            own = {k: v for k, v in own.items() if not k.startswith(f"layer{self.layers.index(self.class_head)}.")}
        hybrid.load_state_arrays({**hybrid.state_arrays(), **own})
        hybrid.chroma_gain, hybrid.kind_head = self.chroma_gain, self.kind_head  # the encoder is the same
        return hybrid

    def with_kind_head(self, kinds: list, seed: int = 0) -> "ColorNet":
        """This net (itself) with a fresh kind head for `kinds`, each at gain 1."""
        self.kind_head = KindHead(self.config["widths"], kinds, seed=seed, dtype=self.layers[0].params["W"].dtype)
        self.kind_head.to_device()
        return self

    # -- saving and loading -------------------------------------------------------------------
    # What `save` writes anew: a tool that saves a loaded file again keeps the rest of its record.
    SAVED_META = ("format_version", "kind", "sha256", "config", "chroma_gain", "decode", "kinds")

    def save(self, path: str | os.PathLike, dtype=np.float16, **meta) -> None:
        """Write weights + architecture config atomically (float16 by default: half the bytes).

        Weights beyond float16's range (65504) are kept in float32 rather than turned into inf.
        """
        arrays = self.state_arrays()
        if self.kind_head is not None:
            arrays.update(self.kind_head.state_arrays(prefix="kind."))
            meta = {"kinds": {"names": self.kind_head.kinds, "gains": self.kind_head.gains}, **meta}
        if dtype is not None and np.dtype(dtype) == np.float16 and \
                max(float(np.abs(a).max(initial=0)) for a in arrays.values()) > float(np.finfo(np.float16).max):
            dtype = np.float32
        if dtype is not None:
            arrays = {name: a.astype(dtype) for name, a in arrays.items()}
        if self.chroma_gain != 1.0:
            meta = {"chroma_gain": self.chroma_gain, **meta}
        if self.class_head is not None:
            meta = {"decode": self.decode, **meta}
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
            config = full_config(config)
            model = cls(widths=tuple(config["widths"]), kernel=config["kernel"], dtype=dtype,
                        out_channels=config["out_channels"], head=config["head"], arch=config["arch"],
                        class_bins=config["class_bins"])
        except (TypeError, KeyError, ValueError):
            raise CorruptFileError(f"{source}: no usable architecture config ({config!r})") from None
        model.load_state_arrays(arrays, source=source)
        gain = meta.get("chroma_gain", 1.0)
        if not (isinstance(gain, (int, float)) and 0 < gain < 10):
            raise CorruptFileError(f"{source}: chroma_gain {gain!r} is not a number in (0, 10)")
        model.chroma_gain = float(gain)
        decode = {**DECODE_DEFAULTS, **(meta.get("decode") or {})}
        if not (isinstance(decode["temperature"], (int, float)) and 0 < decode["temperature"] <= 10 and
                isinstance(decode["regression_weight"], (int, float)) and 0 <= decode["regression_weight"] <= 1):
            raise CorruptFileError(f"{source}: decode settings {meta.get('decode')!r}: the temperature must lie "
                                   "in (0, 10] and the regression weight in [0, 1]")
        model.decode = {name: float(decode[name]) for name in DECODE_DEFAULTS}
        kinds = meta.get("kinds")
        if kinds is not None:
            try:
                names, gains = list(kinds["names"]), [float(g) for g in kinds["gains"]]
                if not isinstance(kinds["names"], list) or not all(isinstance(n, str) for n in names) or \
                        not all(0 < g < 10 for g in gains):
                    raise ValueError
                model.kind_head = KindHead(config["widths"], names, gains, dtype=dtype)
            except (TypeError, KeyError, ValueError):
                raise CorruptFileError(f"{source}: kinds {kinds!r}: names and one gain in (0, 10) for each") from None
            model.kind_head.load_state_arrays(arrays, source=source, prefix="kind.")
        return model


def _stores(layer) -> list:
    """The arrays a layer keeps across steps: its parameters, and BatchNorm's running statistics."""
    return [layer.params] + ([layer.buffers] if hasattr(layer, "buffers") else [])

