"""A ColorNet, or the GAN's critic, run by the fast engine: the textbook model's numbers in
fewer passes over memory.

`Network(model, conv)` reads a ColorNet's structure (model.down, bottleneck, up, head),
`Critic(model, conv)` a critic's (model.layers, after the join of lightness and ab), and both
their layers' params, buffers and settings; they write only what the textbook would write: the
layers' grads, BatchNorm's running statistics and the critic's first `input_grad`, and a
Network keeps the encoder's maps as `encoded`, as the model does. Their
caches are their own: `forward` keeps one record per step of the network, `backward` takes
them back in reverse order.

What runs as one:
- A block, Conv2d (+ BatchNorm2d) (+ ReLU or LeakyReLU) (+ Tanh). In inference BatchNorm is
  folded into the conv and the ReLU runs in the conv's last pass: one pass over the output
  instead of four. In training the ReLU runs inside BatchNorm's normalizing pass, and its mask
  inside BatchNorm's backward; without BatchNorm (the seed network) the ReLU runs in the conv's
  last pass. A conv with a stride (the critic's) runs by strided.py, its LeakyReLU on each
  piece of its output.
- Upsample2d (+ Concat with the skip) and the block after it: the conv taken at the low
  resolution where `upsampled_conv_path` finds a way (no upsampled or joined map is made),
  else Upsample + Concat in one pass and the block.
- MaxPool2d's backward with the ReLU mask of the block before it (seed network), or with the
  skip's gradient added (U-Net).
"""
from __future__ import annotations

from ..backend import array_module
from ..layers import BatchNorm2d, Conv2d, LeakyReLU, ReLU, Tanh
from . import gemm, strided, upsampled, winograd4
from .conv import conv2d_backward, conv2d_forward, conv2d_path, upsampled_conv_path
from .helpers import column_sums
from .norm import batchnorm2d_backward, batchnorm2d_forward, folded_weights, upsample_concat_forward
from .resample import (leaky_relu_backward, maxpool2d_backward, maxpool2d_forward, relu_backward, upsample2d_backward,
                       upsample2d_forward)
from .workspace import prepared


class Block:
    """A Conv2d followed by any of BatchNorm2d, ReLU or LeakyReLU, and Tanh, in that order, run in
    few passes (a LeakyReLU without BatchNorm only).

    forward* return (out, record); the record (None in inference) is what `backward` needs.
    """

    def __init__(self, layers: list):
        rest = list(layers[1:])
        take = lambda kind: rest.pop(0) if rest and isinstance(rest[0], kind) else None
        self.conv, self.bn, self.relu = layers[0], take(BatchNorm2d), take(ReLU)
        self.leaky = take(LeakyReLU) if self.relu is None else None
        self.tanh = take(Tanh)
        if not isinstance(self.conv, Conv2d) or rest or (self.leaky is not None and self.bn is not None):
            raise ValueError("the fast engine runs Conv2d (+ BatchNorm2d) (+ ReLU) (+ Tanh) and "
                             f"Conv2d (+ LeakyReLU) (+ Tanh) blocks, got {layers}")

    def _weights(self) -> tuple:
        """(W, b, the BatchNorm2d to run after the conv or None): in inference BatchNorm folds into W, b."""
        if self.bn is not None and not self.bn.training:
            return (*folded_weights(self.conv, self.bn), None)
        return self.conv.params["W"], self.conv.bias, self.bn

    def forward(self, x, conv: str, inference: bool) -> tuple:
        """x (N, H, W, C) -> (N, Ho, Wo, F): (N, H, W, F) for a 'same' conv."""
        w, b, bn = self._weights()
        slope = None if self.leaky is None else self.leaky.slope
        if not self.conv.same:
            out, cache = strided.forward(x, w, b, self.conv.stride, self.conv.padding, slope)
        else:
            out, cache = conv2d_forward(x, w, b, conv2d_path(x, w, conv), relu=self.relu is not None and bn is None,
                                        inference=inference, slope=slope)
        return self._after_conv(out, ("conv", cache), bn, inference)

    def forward_upsampled(self, x_low, skip, conv: str, inference: bool) -> tuple:
        """Upsample2d, then Concat with `skip` unless it is None, then this block: x_low (N, h, w, Cu),
        skip (N, 2h, 2w, Cs) -> (N, 2h, 2w, F)."""
        w, b, bn = self._weights()
        relu = self.relu is not None and bn is None
        path = upsampled_conv_path(x_low, skip, w, conv, inference)
        if path is None:  # the joined map, made in one pass, then the block as usual
            joined = upsample2d_forward(x_low) if skip is None else upsample_concat_forward(x_low, skip)
            out, cache = conv2d_forward(joined, w, b, conv2d_path(joined, w, conv), relu=relu, inference=inference)
            return self._after_conv(out, ("joined", cache, x_low.shape[-1]), bn, inference)
        out, skip_cache = UPSAMPLED_CONVS[path](x_low, skip, w, b, relu, conv, inference)
        return self._after_conv(out, ("upsampled", x_low, skip_cache), bn, inference)

    def _after_conv(self, out, conv_record: tuple, bn, inference: bool) -> tuple:
        bn_cache = None
        if bn is not None:  # training: the batch's statistics, the ReLU in the same pass
            out, bn_cache = batchnorm2d_forward(bn, out, relu=self.relu is not None)
        if self.tanh is not None:
            out = array_module(out).tanh(out)
        return out, None if inference else (conv_record, bn_cache, out)

    def backward(self, d, record: tuple, relu_done: bool = False) -> tuple:
        """d (N, H, W, F) of the block's output -> (dx of its input, or None for a network's first
        conv; dskip or None); fills the layers' grads. `relu_done`: d already went back through the ReLU."""
        conv_record, bn_cache, out = record
        if self.tanh is not None:
            d = (1 - out * out) * d
        if self.bn is not None:
            d = batchnorm2d_backward(self.bn, d, bn_cache)  # the ReLU's mask inside
        elif self.relu is not None and not relu_done:
            d = relu_backward(d, out)
        elif self.leaky is not None:
            d = leaky_relu_backward(d, out, self.leaky.slope)
        kind, w = conv_record[0], self.conv.params["W"]
        if kind == "conv":
            dx, dw, db = conv2d_backward(d, w, conv_record[1], self.conv.input_grad)
            return self._store(dw, db, dx, None)
        if kind == "joined":
            _, cache, channels_up = conv_record
            d_joined, dw, db = conv2d_backward(d, w, cache)
            d_skip = d_joined[..., channels_up:] if d_joined.shape[-1] > channels_up else None
            return self._store(dw, db, upsample2d_backward(d_joined[..., :channels_up]), d_skip)
        _, x_low, skip_cache = conv_record  # "upsampled": the low-resolution part by the phases
        xp, C = array_module(d), x_low.shape[-1]
        dx, dw_up = upsampled.backward(d, x_low, xp.ascontiguousarray(w[:, :, :C]))
        if skip_cache is None:
            return self._store(dw_up, column_sums(d.reshape(-1, d.shape[-1])), dx, None)
        d_skip, dw_skip, db = conv2d_backward(d, xp.ascontiguousarray(w[:, :, C:]), skip_cache)
        return self._store(xp.concatenate([dw_up, dw_skip], axis=2), db, dx, d_skip)

    def _store(self, dw, db, dx, d_skip) -> tuple:
        self.conv.grads["W"] = dw
        if "b" in self.conv.params:
            self.conv.grads["b"] = db
        return dx, d_skip


# The ways upsampled_conv_path names: (x_low, skip, w, b, relu, conv, inference) -> (out, skip's conv cache).

def _shift(x_low, skip, w, b, relu, conv, inference) -> tuple:
    return gemm.multiply_then_shift(skip, w, b, relu, upsampled=x_low), None


def _phases(x_low, skip, w, b, relu, conv, inference) -> tuple:
    N, h, w_, _ = x_low.shape
    out = array_module(x_low).empty((N, 2 * h, 2 * w_, w.shape[-1]), dtype=x_low.dtype)
    upsampled.add_forward(x_low, w, out, b=b, relu=relu)
    return out, None


def _winograd4(x_low, skip, w, b, relu, conv, inference) -> tuple:
    return winograd4.forward(skip, w, b, relu, keep_v=not inference, upsampled=x_low)


def _phases_and_skip(x_low, skip, w, b, relu, conv, inference) -> tuple:
    xp, C = array_module(x_low), x_low.shape[-1]
    split = lambda w: (xp.ascontiguousarray(w[:, :, :C]), xp.ascontiguousarray(w[:, :, C:]))
    # in inference the same arrays each time, so that the skip's Winograd transform is prepared once too
    w_up, w_skip = prepared(f"split {C}", (w,), split) if inference else split(w)
    out, skip_cache = conv2d_forward(skip, w_skip, b, conv2d_path(skip, w_skip, conv), inference=inference)
    upsampled.add_forward(x_low, w_up, out, relu=relu)
    return out, skip_cache


UPSAMPLED_CONVS = {"shift": _shift, "phases": _phases, "winograd4": _winograd4, "phases+skip": _phases_and_skip}


class Network:
    """Runs `model` (a ColorNet) with the fast engine: train(), eval(), forward, backward as the model's."""

    def __init__(self, model, conv: str = "auto"):
        self.model, self.conv = model, conv
        self.down = [Block(block) for block, _ in model.down]
        self.bottleneck = Block(model.bottleneck)
        # The decoder's blocks; every one after the first reads the level before it upsampled,
        # joined with the encoder's map of that size in the U-Net.
        self.decoder = [Block(block) for block, _, _ in model.up] + [Block(model.head)]
        self.joins = [cat is not None for _, _, cat in model.up]
        # A class head reads the last block's input too: its logits join the head's a*b*.
        self.class_block = None if model.class_head is None else Block([model.class_head])
        self.records: list = []
        self.encoded: list = []

    def train(self) -> "Network":
        self.model.train()
        return self

    def eval(self) -> "Network":
        self.model.eval()
        return self

    @property
    def training(self) -> bool:
        return self.model.training

    def forward(self, lightness):
        """(N, H, W, 1) scaled lightness -> (N, H, W, 2) scaled ab (or (N, H, W, Q) bin logits)."""
        self.model.check_size(lightness.shape)
        inference, conv = not self.model.training, self.conv
        self.records = records = []
        keep = (lambda record: None) if inference else records.append
        x, skips = lightness, []
        for block in self.down:
            x, record = block.forward(x, conv, inference)
            keep(record)
            skips.append(x)
            x, pool_cache = maxpool2d_forward(x)
            keep(pool_cache)
        x, record = self.bottleneck.forward(x, conv, inference)
        keep(record)
        self.encoded = [*skips, x]  # as the model's encode keeps them: what a kind head reads
        x, record = self.decoder[0].forward(x, conv, inference)
        keep(record)
        for i, block in enumerate(self.decoder[1:]):
            x_low, skip = x, skips[-1 - i] if self.joins[i] else None
            x, record = block.forward_upsampled(x_low, skip, conv, inference)
            keep(record)
        if self.class_block is not None:  # the model has two decoder levels or more: x_low is the head's
            logits, record = self.class_block.forward_upsampled(x_low, skip, conv, inference)
            keep(record)
            x = array_module(x).concatenate([x, logits], axis=-1)
        return x

    __call__ = forward

    def backward(self, d_ab) -> None:
        """Backpropagate dloss/d(output) (N, H, W, 2), or (N, H, W, 2 + Q) with a class head, through
        the last forward pass (in training mode)."""
        if not self.model.training or not self.records:
            raise RuntimeError("backward needs a forward pass in training mode: call model.train() first "
                               "(in eval mode forward keeps nothing for a backward)")
        records, d, d_skips, d_class = self.records, d_ab, [], None
        if self.class_block is not None:
            # the logits' gradient as a view: the block's GEMMs take its stride, a copy costs more
            d_class = self.class_block.backward(d[..., 2:], records.pop())
            d = array_module(d).ascontiguousarray(d[..., :2])
        for block in reversed(self.decoder[1:]):
            d, d_skip = block.backward(d, records.pop())
            if d_class is not None:  # the head's input fed the class head too: the gradients add
                d, d_skip = d + d_class[0], None if d_skip is None else d_skip + d_class[1]
                d_class = None
            if d_skip is not None:
                d_skips.append(d_skip)  # the shallowest level's first
        d, _ = self.decoder[0].backward(d, records.pop())
        d, _ = self.bottleneck.backward(d, records.pop())
        for block in reversed(self.down):
            pool_cache, record = records.pop(), records.pop()
            d, relu_done = _pool_backward(block, d, pool_cache, d_skips.pop() if d_skips else None)
            d, _ = block.backward(d, record, relu_done)


class Critic:
    """Runs `model` (the GAN's critic: the lightness and ab joined along channels, then
    `model.layers`, Conv2d each followed by a LeakyReLU but the last) with the fast engine:
    forward and backward as the model's."""

    def __init__(self, model, conv: str = "auto"):
        self.model, self.conv = model, conv
        starts = [i for i, layer in enumerate(model.layers) if isinstance(layer, Conv2d)] + [len(model.layers)]
        self.blocks = [Block(model.layers[a:b]) for a, b in zip(starts, starts[1:])]
        self.records: list = []

    def forward(self, lightness, ab):
        """lightness (N, H, W, 1), ab (N, H, W, 2) -> logits (N, h, w, 1)."""
        x = array_module(ab).concatenate([lightness, ab], axis=-1)
        self.records = [lightness.shape[-1]]
        for block in self.blocks:
            x, record = block.forward(x, self.conv, inference=False)
            self.records.append(record)
        return x

    __call__ = forward

    def backward(self, d_logits, input_grad: bool = True):
        """d loss / d logits (N, h, w, 1) -> d loss / d ab (N, H, W, 2), or None without `input_grad`;
        fills the layers' grads."""
        if not self.records:
            raise RuntimeError("backward needs a forward pass first")
        self.blocks[0].conv.input_grad = input_grad  # as the model's own backward sets it
        d = d_logits
        for block in reversed(self.blocks):
            d, _ = block.backward(d, self.records.pop())
        split = self.records.pop()
        return array_module(d).ascontiguousarray(d[..., split:]) if input_grad else None


def _pool_backward(block: Block, d, pool_cache: tuple, d_skip) -> tuple:
    """The MaxPool2d's backward after `block`, plus the skip's gradient (U-Net), or with the
    block's ReLU mask taken at the pooled size (seed network): (dx, whether the ReLU is done)."""
    if d_skip is None:
        relu_done = block.relu is not None and block.bn is None
        return maxpool2d_backward(d, pool_cache, relu=relu_done), relu_done
    H, W = pool_cache[0].shape[1:3]
    if H % 2 or W % 2:
        d = maxpool2d_backward(d, pool_cache)
        d += d_skip
        return d, False
    return maxpool2d_backward(d, pool_cache, plus=d_skip), False
