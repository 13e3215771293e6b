"""Adversarial fine-tuning: a PatchGAN critic, and the two alternating steps of pix2pix.

The regression loss (MSE) makes the colorization network predict the mean of the plausible
colors of a patch, which is duller than any of them. A critic (Isola et al. 2017, "pix2pix";
DeOldify's NoGAN schedule) learns to tell real (L, ab) pairs from generated ones; the generator
is then also rewarded for pairs the critic takes for real, which a gray-brown mean is not.

The critic: pix2pix's PatchGAN without BatchNorm, on the lightness and the chroma side by side,
with 3x3 kernels as in SRGAN's discriminator (Ledig et al. 2017): stride 2 to halve the size,
stride 1 with 'same' padding after. For widths (w0, w1, w2), the default (32, 64, 128), and a
pair of size H x W (even; an odd side rounds up at each halving):

    pair = concat(L, ab)                                       (N, H, W, 3)
    Conv 3x3 stride 2 pad 1 (3 -> w0) + LeakyReLU 0.2          (N, H/2, W/2, w0)
    Conv 3x3 stride 2 pad 1 (w0 -> w1) + LeakyReLU 0.2         (N, H/4, W/4, w1)
    Conv 3x3 stride 1 pad 1 (w1 -> w2) + LeakyReLU 0.2         (N, H/4, W/4, w2)
    Conv 3x3 stride 1 pad 1 (w2 -> 1)                          (N, H/4, W/4, 1)  logits

Every width but the last halves the size (stride 2). Each logit judges one patch of the pair
(23 x 23 pixels for three widths), so the critic works at any size and says where a picture
looks generated, not only whether. Without BatchNorm each logit depends on its own pair alone:
real and generated pairs go through as one batch, and data parallelism needs no statistics
across processes.

One training step on a batch (`GAN.train_step`), as in pix2pix:
  1. the generator colorizes: ab_fake = G(L);
  2. critic step: binary cross-entropy on logits, real pairs (L, ab) labelled 1 and generated
     pairs (L, ab_fake) labelled 0, the mean over both halves (pix2pix's halved critic loss);
     one Adam step of the critic (lr 2e-4, beta1 0.5, as pix2pix);
  3. generator step: loss = lambda * MSE(ab_fake, ab) + BCE(critic(L, ab_fake), 1), the second
     term through the critic just updated; its gradient d/d ab_fake runs back through the
     critic's layers into the generator. For the first `warmup` steps the adversarial term is
     off: the critic learns on real and generated pairs while the generator goes on with
     regression alone (DeOldify pretrains its critic before the adversarial phase).
"""
from __future__ import annotations

import numpy as np

from . import engine
from .backend import array_module
from .distributed import GradientAverager, World
from .layers import Concat, Conv2d, LeakyReLU
from .loss import BCEWithLogitsLoss
from .model import Module
from .optim import Adam

CRITIC_WIDTHS = (32, 64, 128)
LAMBDA = 100.0        # pix2pix's weight of the regression loss (lambda_L1 = 100)
CRITIC_LR = 2e-4      # pix2pix's learning rate, for the critic
CRITIC_BETAS = (0.5, 0.999)
WARMUP = 100          # steps of critic alone before the adversarial term is on
SLOPE = 0.2           # LeakyReLU's slope for negative inputs, as pix2pix


class PatchCritic(Module):
    """PatchGAN critic: lightness (N, H, W, 1) and ab (N, H, W, 2) -> logits (N, h, w, 1), one per
    patch, positive for pairs it takes for real. See the module docstring for the layers."""

    def __init__(self, widths: tuple = CRITIC_WIDTHS, seed: int = 0, dtype=np.float32):
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"critic widths must be positive channel counts, got {widths}")
        rng = np.random.default_rng(seed)
        self.widths = tuple(int(w) for w in widths)
        self.join = Concat()
        self.layers, c = [], 3
        for i, w in enumerate(self.widths):
            stride = 2 if i < len(self.widths) - 1 else 1
            self.layers += [Conv2d(c, w, 3, rng=rng, dtype=dtype, stride=stride, padding=1), LeakyReLU(SLOPE)]
            c = w
        self.layers.append(Conv2d(c, 1, 3, rng=rng, dtype=dtype, stride=1, padding=1))
        self.to_device()

    def output_size(self, size: int) -> int:
        """Logits along a side of `size` pixels: size / 4 rounded up, for three widths."""
        for layer in self.layers:
            if isinstance(layer, Conv2d):
                size = (size + 2 * layer.padding - layer.k) // layer.stride + 1
        return size

    def forward(self, lightness, ab):
        """lightness (N, H, W, 1), ab (N, H, W, 2), both scaled to [-1, 1] -> logits (N, h, w, 1)."""
        x = self.join.forward(lightness, ab)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, d_logits, input_grad: bool = True):
        """d loss / d logits (N, h, w, 1) -> d loss / d ab (N, H, W, 2), or None without
        `input_grad` (the critic's own step needs only its parameter gradients); fills grads."""
        self.layers[0].input_grad = input_grad
        d = d_logits
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return self.join.backward(d)[1] if input_grad else None


class GAN:
    """The critic, its optimizer and the alternating steps that fine-tune a generator with it.

    lam weighs the regression loss against the adversarial one; `warmup` steps of critic alone
    come first. Under MPI (`world` of several processes) the critic's gradients are averaged
    like the generator's; `loss_sums` adds up the critic's loss and the generator's adversarial
    loss of every step (means over all processes), for the log.
    """

    def __init__(self, lam: float = LAMBDA, critic_lr: float = CRITIC_LR, warmup: int = WARMUP,
                 widths: tuple = CRITIC_WIDTHS, seed: int = 0, dtype=np.float32, world: World | None = None):
        self.lam, self.warmup = lam, warmup
        self.critic = PatchCritic(widths, seed=seed, dtype=dtype)
        self.optimizer = Adam(self.critic.param_layers, lr=critic_lr, betas=CRITIC_BETAS, map_tasks=engine.map_tasks())
        self.bce = BCEWithLogitsLoss()
        world = world or World()
        self.averager = GradientAverager(self.critic.param_layers, world) if world.size > 1 else None
        self.loss_sums = [0.0, 0.0]  # critic loss, adversarial loss

    def train_step(self, generator, regression, optimizer: Adam, lightness, ab_true, step: int,
                   reduce_gradients=None):
        """One critic step, then one generator step, on a batch (global step `step`, 0-based):
        returns the regression loss (before the step), as trainer.train_step does.

        generator: a ColorNet, or what engine.network made of one. lightness (N, H, W, 1), ab_true
        (N, H, W, 2). With data parallelism `reduce_gradients((loss, adversarial loss))` averages
        the generator's gradients and both losses over all processes.
        """
        ab_fake = generator.train().forward(lightness)         # (N, H, W, 2)
        critic_loss, fake_logits = self.critic_step(lightness, ab_true, ab_fake)
        loss = regression.forward(ab_fake, ab_true)
        d_ab = regression.backward() * self.lam
        if step >= self.warmup:  # through the critic just updated
            adversarial, d_fake = self.adversarial_gradient(lightness, ab_fake)
            d_ab += d_fake
        else:                    # what the term would be: logged, not trained on
            adversarial = self.bce.forward(fake_logits, 1.0)
        generator.backward(d_ab)
        if reduce_gradients is not None:
            loss, adversarial = reduce_gradients((loss, adversarial))
        optimizer.step()
        self._add_losses(critic_loss, adversarial)
        return loss

    def critic_step(self, lightness, ab_true, ab_fake) -> tuple:
        """One Adam step of the critic on N real pairs (label 1) and N generated ones (label 0),
        as one batch of 2N: (its loss before the step, the logits of the generated pairs)."""
        xp = array_module(lightness)
        n = len(lightness)
        critic = engine.network(self.critic)
        logits = critic.forward(xp.concatenate([lightness, lightness]), xp.concatenate([ab_true, ab_fake]))
        labels = xp.concatenate([xp.ones(n, logits.dtype), xp.zeros(n, logits.dtype)]).reshape(-1, 1, 1, 1)
        loss = self.bce.forward(logits, labels)
        critic.backward(self.bce.backward(), input_grad=False)
        if self.averager is not None:
            loss = self.averager.reduce_gradients(loss)
        self.optimizer.step()
        return loss, logits[n:]

    def adversarial_gradient(self, lightness, ab_fake) -> tuple:
        """The generator's adversarial loss BCE(critic(L, ab_fake), 1) and its gradient d/d ab_fake
        (N, H, W, 2), back through the critic (whose own gradients are left unused)."""
        critic = engine.network(self.critic)
        loss = self.bce.forward(critic.forward(lightness, ab_fake), 1.0)
        return loss, critic.backward(self.bce.backward())

    def _add_losses(self, *losses) -> None:
        """Add a step's losses to loss_sums: as Python floats on the CPU, kept on the GPU (no wait)."""
        for i, value in enumerate(losses):
            self.loss_sums[i] = self.loss_sums[i] + (float(value) if isinstance(value, (float, np.generic)) else value)

    def take_loss_means(self, steps: int) -> dict:
        """{'critic_loss', 'adv_loss'}: the means over `steps` steps of loss_sums, which restart at 0."""
        means = {name: round(float(total) / max(steps, 1), 6)
                 for name, total in zip(("critic_loss", "adv_loss"), self.loss_sums)}
        self.loss_sums = [0.0, 0.0]
        return means

    # -- checkpoints ------------------------------------------------------------------------------
    def state_arrays(self) -> dict:
        """The critic's weights ('critic.layer<i>.<name>') and Adam state ('critic.adam.<name>')."""
        return {**self.critic.state_arrays(prefix="critic."), **self.optimizer.state_arrays("critic.adam.")}

    def load_state_arrays(self, arrays: dict, source: str) -> None:
        self.critic.load_state_arrays(arrays, source=source, prefix="critic.")
        self.optimizer.load_state_arrays(arrays, "critic.adam.")
