"""Training: one step of gradient descent (`train_step`), and the loop around it (`Trainer`):
data, epochs, validation, and after every epoch the run folder's files (runfolder.py).

The order of mini-batches depends only on (seed, epoch), so --resume continues exactly.

With `gan`, every step is a critic step and then a generator step (gan.py): adversarial
fine-tuning of a trained generator with a PatchGAN critic.

Data-parallel over MPI (see distributed.py): with N processes every global batch of the same
plan is cut into N equal shards, rank r computing shard r; the averaged gradient equals the
one-process gradient of the whole batch, so every rank takes the same Adam step. Validation is
split across ranks and its sums reduced; only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import backend, engine
from .classify import REBALANCE_LAMBDA, ClassificationLoss, HybridLoss, RebalancedMSELoss
from .color import lab_to_rgb, unscale_ab, unscale_lightness
from .data import (DataError, center_crop, crop_offsets, epoch_plan, load_dataset, make_batch, repeat_indices,
                   split_indices)
from .distributed import GradientAverager, World
from .gan import CRITIC_LR, CRITIC_WIDTHS, GAN, LAMBDA, WARMUP
from .images import side_by_side
from .infer import weights_file
from .layers import BatchNorm2d
from .loss import ChromaMatchedMSELoss, MSELoss, PhotoLogMSELoss
from .metrics import psnr
from .model import DEFAULT_ARCH, DEFAULT_WIDTHS, ColorNet, full_config
from .optim import Adam, scheduled_lr
from .progress import progress_bar
from .runfolder import RunFolder
from .serialize import load_npz

PREVIEW_IMAGES = 4
LOSSES = ("mse", "psnr", "classify", "hybrid")
CLASS_WEIGHT = 0.002  # a trained net's cross-entropy (~2.7 nats) then weighs about its MSE (~0.005)

# On a GPU the per-step losses stay on the device and are read back (one host sync) every this
# many steps; on the CPU every step's loss is checked at once.
SYNC_EVERY_ON_DEVICE = 32


@dataclass
class TrainConfig:
    data: str | list | None           # a folder or a list of them; None with resume: the run's own
    out: str
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3                  # the peak learning rate
    schedule: str = "constant"        # 'constant' or 'cosine' over all `epochs` (optim.scheduled_lr)
    warmup: int = 0                   # steps of linear warm-up to lr
    size: int = 64
    val_fraction: float = 0.1
    seed: int = 0
    widths: tuple = DEFAULT_WIDTHS
    arch: str = DEFAULT_ARCH          # 'unet' (BatchNorm + skips) or 'seed' (plain autoencoder), see model.py
    crop_margin: int | None = None    # photos stored at size + margin (None: size // 4); batches take random size x size crops
    loss: str = "mse"                 # one of LOSSES: a*b* regression, its per-photo log, Zhang's bins, both heads
    class_weight: float = CLASS_WEIGHT  # 'hybrid': weight of the class head's cross-entropy
    rebalance: float | None = None    # lambda of the class rebalancing (None: 0.5 for classify, off for mse)
    chroma_match: float = 0.0         # weight of ChromaMatchedMSELoss's per-photo chroma term (0: plain MSE)
    repeat: dict | None = None        # {folder: k}: the training photos in folder appear k times an epoch
    limit: int | None = None          # use only the first `limit` images (quick experiments)
    init: str | None = None           # start from these weights (e.g. the shipped model), fresh Adam state
    photos: dict | None = None        # data.photo_record of `data`: --resume checks photos that moved
    gan: bool = False                 # adversarial fine-tuning with a PatchGAN critic (gan.py)
    gan_lambda: float = LAMBDA        # generator loss = gan_lambda * MSE + the critic's BCE
    critic_lr: float = CRITIC_LR
    critic_warmup: int = WARMUP       # steps before the adversarial term is on
    critic_widths: tuple = CRITIC_WIDTHS
    progress: bool = True
    history: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.crop_margin is None:
            self.crop_margin = self.size // 4
        if self.chroma_match < 0:
            raise ValueError(f"--chroma-match must be >= 0, got {self.chroma_match}")
        if self.class_weight <= 0:
            raise ValueError(f"--class-weight must be > 0, got {self.class_weight}")
        if self.loss == "hybrid" and self.rebalance not in (None, 1):
            raise ValueError("--loss hybrid trains the class head without rebalancing: leave out --rebalance")
        if self.chroma_match and (self.loss in ("classify", "psnr") or self.rebalance not in (None, 1)):
            raise ValueError("--chroma-match adds to the plain regression loss: "
                             "it needs --loss mse or hybrid, without --rebalance")
        if self.loss == "psnr" and self.rebalance not in (None, 1):
            raise ValueError("--loss psnr weighs each photo by its own error: leave out --rebalance")


class TrainingStopped(RuntimeError):
    """Training ended early: interrupted by the user (exit 130) or diverged (exit 1)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def lab_to_rgb_batch(lightness, ab) -> np.ndarray:
    """Scaled lightness (N, H, W, 1) + scaled ab (N, H, W, 2) -> RGB (N, H, W, 3) in [0, 1]."""
    lab = np.concatenate([unscale_lightness(backend.to_numpy(lightness)),
                          unscale_ab(backend.to_numpy(ab))], axis=-1).astype(np.float64)
    return lab_to_rgb(lab)


def train_step(net, loss_fn, optimizer: Adam, lightness, ab_true, reduce_gradients=None):
    """One step of gradient descent on a batch; returns its loss (before the step).

    net: a ColorNet, or what engine.network made of one. lightness (N, H, W, 1) and ab_true
    (N, H, W, 2), scaled to [-1, 1]. With data parallelism, `reduce_gradients(loss)` replaces
    every gradient (and the loss) by its mean over all processes.
    """
    ab_pred = net.train().forward(lightness)     # (N, H, W, 2)
    loss = loss_fn.forward(ab_pred, ab_true)
    net.backward(loss_fn.backward())             # fills every layer's grads
    if reduce_gradients is not None:
        loss = reduce_gradients(loss)
    optimizer.step()                             # one Adam update of every parameter
    return loss


class Trainer:
    """Trains one model, alone or as one rank of an MPI `world`.

    dtype is the parameter precision of a new run (float64 only for exactness checks); a resumed
    run keeps its checkpoint's precision. `on_step(epoch, step)`, if given, is called before each
    step (epoch 1-based, steps done in it so far) and with (0, 0) before the photos load: tests
    use it to act at an exact moment of a run.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, world: World | None = None, dtype=np.float32,
                 on_step: Callable[[int, int], None] | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.world = world or World()
        self.progress = cfg.progress and self.world.is_root  # the other ranks stay quiet
        self.folder = RunFolder(cfg.out)
        self.checkpoint_path = self.folder.checkpoint
        self.epoch, self.step, self.loss_sum, self.cpu_seconds = 0, 0, 0.0, 0.0
        self.dtype = np.dtype(dtype)
        self.on_step = on_step or (lambda epoch, step: None)
        if resume:
            self._load_checkpoint()
        if cfg.batch_size % self.world.size:
            raise ValueError(f"batch size {cfg.batch_size} must divide by the {self.world.size} processes: "
                             f"each takes an equal share of every batch")
        self.on_step(0, 0)
        with warnings.catch_warnings():
            if not self.world.is_root:
                warnings.simplefilter("ignore")  # rank 0 already reports skipped images
            self.lightness, self.ab, paths = load_dataset(cfg.data, cfg.size + cfg.crop_margin, limit=cfg.limit,
                                                          progress=self.progress, with_paths=True)
        self.train_idx, self.val_idx = split_indices(len(self.lightness), cfg.val_fraction, cfg.seed)
        if cfg.repeat:
            self.train_idx = repeat_indices(self.train_idx, paths, cfg.repeat)
        if len(self.val_idx) == 0 and self.world.is_root:
            count = len(self.lightness)
            warnings.warn(f"no validation set ({count} photo{'s' * (count != 1)}, --val-fraction "
                          f"{cfg.val_fraction:g}): each epoch reports the training loss alone")
        if len(self.train_idx) < cfg.batch_size:
            raise DataError(f"batch size {cfg.batch_size} is larger than the {len(self.train_idx)} "
                            f"training images: lower --batch-size or add photos")
        factor = 2 ** (len(cfg.widths) - 1)
        if cfg.size % factor:
            raise ValueError(f"--size {cfg.size} must divide by {factor}, the downsampling factor "
                             f"of a {len(cfg.widths)}-width network")
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
        if cfg.gan and cfg.loss != "mse":
            raise ValueError("--gan fine-tunes a regression model: it needs --loss mse")
        if cfg.rebalance is not None and not 0 < cfg.rebalance <= 1:
            raise ValueError(f"--rebalance must be in (0, 1], got {cfg.rebalance}")
        if cfg.loss == "classify" or cfg.rebalance not in (None, 1):
            weighted = ClassificationLoss if cfg.loss == "classify" else RebalancedMSELoss
            if getattr(self, "class_weights", None) is None:  # estimated once, then kept in the checkpoint
                lam = REBALANCE_LAMBDA if cfg.rebalance is None else cfg.rebalance
                self.class_weights = weighted.from_training_ab(self.ab[self.train_idx], lam).weights
            self.loss = weighted(self.class_weights)
        elif cfg.loss == "hybrid":
            self.loss = HybridLoss(cfg.class_weight, cfg.chroma_match)
        elif cfg.loss == "psnr":
            self.loss = PhotoLogMSELoss()
        else:
            self.loss = ChromaMatchedMSELoss(cfg.chroma_match) if cfg.chroma_match else MSELoss()
        if not resume:
            head = {}
            if cfg.loss == "classify":  # the bin logits are the output
                head = {"out_channels": len(self.loss.centers), "head": "logits"}
            elif cfg.loss == "hybrid":  # beside the a*b*
                head = {"class_bins": len(self.loss.centers)}
            self.model = ColorNet(cfg.widths, seed=cfg.seed, dtype=self.dtype, arch=cfg.arch, **head)
            if cfg.init:
                self._load_initial_weights(cfg.init)
            self.optimizer = Adam(self.model.param_layers, lr=cfg.lr, map_tasks=engine.map_tasks())
            self.gan = self._new_gan()
        self.net = engine.network(self.model)  # what computes the model: the textbook or the fast engine
        self.averager = None if self.world.size == 1 else \
            GradientAverager(self.model.param_layers, self.world, losses=1 if self.gan is None else 2)
        if self.world.size > 1:  # BatchNorm normalizes each shard with the whole batch's statistics
            for layer in self.model.layers:
                if isinstance(layer, BatchNorm2d):
                    layer.shards, layer.sum_over_batch = self.world.size, self._sum_over_ranks

    def _sum_over_ranks(self, partial):
        """Per-channel sums (k, C) of this rank's shard -> the sums over all ranks, same dtype and device."""
        return backend.xp.asarray(self.world.sum(backend.to_numpy(partial)), dtype=partial.dtype)

    def _new_gan(self) -> GAN | None:
        """The critic and its optimizer of a --gan run (fresh), else None."""
        cfg = self.cfg
        if not cfg.gan:
            return None
        return GAN(cfg.gan_lambda, cfg.critic_lr, cfg.critic_warmup, tuple(cfg.critic_widths), seed=cfg.seed,
                       dtype=self.dtype, world=self.world)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        arrays = {**self.model.state_arrays(), **self.optimizer.state_arrays("adam.")}
        if getattr(self, "class_weights", None) is not None:
            arrays["class_weights"] = np.asarray(self.class_weights)
        gan_meta = {}
        if self.gan is not None:  # the critic, its Adam state and its epoch's loss sums too
            arrays.update(self.gan.state_arrays())
            gan_meta["gan_loss_sums"] = [float(total) for total in self.gan.loss_sums]
        train_config = {k: v for k, v in asdict(self.cfg).items() if k != "history"}
        self.folder.save_checkpoint(arrays, config=self.model.config, train_config=train_config, epoch=self.epoch,
                                    step=self.step, loss_sum=self.loss_sum, cpu_seconds=self.cpu_seconds,
                                    history=self.cfg.history, **gan_meta)

    def _load_checkpoint(self) -> None:
        arrays, meta = self.folder.load_checkpoint()
        stored = meta["train_config"]
        for key in ("size", "batch_size", "seed", "val_fraction", "limit", "widths", "lr"):
            setattr(self.cfg, key, tuple(stored[key]) if key == "widths" else stored[key])
        self.cfg.loss, self.cfg.rebalance = stored.get("loss", "mse"), stored.get("rebalance")
        self.cfg.class_weight = stored.get("class_weight", CLASS_WEIGHT)
        self.cfg.chroma_match, self.cfg.repeat = stored.get("chroma_match", 0.0), stored.get("repeat")
        self.cfg.crop_margin = stored.get("crop_margin", 0)
        self.cfg.schedule, self.cfg.warmup = stored.get("schedule", "constant"), stored.get("warmup", 0)
        self.cfg.arch = meta["config"].get("arch", "seed")
        self.cfg.gan = stored.get("gan", False)
        if self.cfg.gan:
            for key in ("gan_lambda", "critic_lr", "critic_warmup", "critic_widths"):
                setattr(self.cfg, key, tuple(stored[key]) if key == "critic_widths" else stored[key])
        self.class_weights = arrays.pop("class_weights", None)
        self.cfg.history = meta["history"]
        if self.cfg.data is None:  # resume on the photos the run was started with
            self.cfg.data = stored["data"]
        self.dtype = arrays["layer0.W"].dtype if "layer0.W" in arrays else np.dtype(np.float32)
        self.model = ColorNet.from_contents(arrays, meta, source=str(self.checkpoint_path), dtype=self.dtype)
        self.optimizer = Adam(self.model.param_layers, lr=self.cfg.lr, map_tasks=engine.map_tasks())
        self.optimizer.load_state_arrays(arrays, "adam.")
        self.gan = self._new_gan()
        if self.gan is not None:
            self.gan.load_state_arrays(arrays, source=str(self.checkpoint_path))
            self.gan.loss_sums = list(meta["gan_loss_sums"])
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.loss_sum, self.cpu_seconds = meta["loss_sum"], meta["cpu_seconds"]

    def _load_initial_weights(self, path: str) -> None:
        """Fine-tune: copy the weights of a file whose architecture matches this run's, or grow a
        U-Net one level deeper (this run's widths = the file's and one more), or widen a net (as
        many widths, none narrower), so that it starts where the file was.
        A --loss hybrid run keeps the file's class head, or starts a fresh one beside its a*b* head."""
        arrays, meta = load_npz(weights_file(path))
        config = full_config(meta.get("config") or {})
        run = full_config(self.model.config)
        if config["class_bins"] and not run["class_bins"] and self.world.is_root:  # training moves its features
            warnings.warn(f"{path}: its class head is left out (train.py trains the a*b* head); "
                          "fit a new one with python -m nanocolor.classhead, or train both with --loss hybrid")
        if meta.get("kinds") and self.world.is_root:
            warnings.warn(f"{path}: its kind head is left out (training moves the features it reads); "
                          "fit a new one with python -m nanocolor.kindhead")
        if run["class_bins"] and config["class_bins"] != run["class_bins"]:
            start = ColorNet.from_contents(arrays, meta, source=str(path), dtype=self.dtype)
            arrays = start.with_class_head(run["class_bins"], seed=self.cfg.seed).state_arrays()
        config["class_bins"] = run["class_bins"]
        if config != run:
            old_widths, widths = config["widths"], run["widths"]
            deeper = config == {**run, "widths": widths[:-1]}  # deepened() refuses all but a U-Net
            wider = config == {**run, "widths": old_widths} and len(old_widths) == len(widths) \
                and all(new >= old for new, old in zip(widths, old_widths))
            if not (deeper or wider):
                raise ValueError(f"{path}: architecture {config} does not match this run's {run} (set --arch / "
                                 "--widths / --loss to match, add one width to grow a U-Net a level, or give "
                                 "wider widths to widen it)")
            start = ColorNet.from_contents(arrays, {**meta, "config": config}, source=str(path), dtype=self.dtype)
            grown = start.deepened(widths[-1], seed=self.cfg.seed) if deeper else start.widened(widths, self.cfg.seed)
            arrays = grown.state_arrays()
        self.model.load_state_arrays(arrays, source=str(path))

    def predict_scaled_ab(self, lightness) -> np.ndarray:
        """Scaled lightness (N, H, W, 1) -> the model's scaled a*b* (N, H, W, 2) on the host
        (bin logits decoded by the annealed mean; both heads of a hybrid blended as colorizing does)."""
        out = self.net.eval().forward(backend.xp.asarray(lightness, dtype=self.dtype))
        if self.cfg.loss == "hybrid":
            return backend.to_numpy(self.loss.decode(out, **self.model.decode))
        return backend.to_numpy(self.loss.decode(out) if self.cfg.loss == "classify" else out)

    # -- one epoch ------------------------------------------------------------------------------
    def train_step(self, lightness, ab_true, step: int = 0):
        """One Adam step on this rank's shard (global step `step`: a GAN's warm-up counts them);
        returns the loss of the whole (global) batch."""
        # Under MPI every rank joins the Allreduce, even with a diverged shard: a NaN anywhere
        # makes the reduced loss NaN everywhere, so all ranks stop together.
        reduce = None if self.averager is None else self.averager.reduce_gradients
        if self.gan is not None:
            return self.gan.train_step(self.net, self.loss, self.optimizer, lightness, ab_true, step, reduce)
        return train_step(self.net, self.loss, self.optimizer, lightness, ab_true, reduce)

    def validate(self, batch_size: int = 64) -> tuple[float, float]:
        """Mean validation MSE (scaled ab) and mean PSNR (dB, 8-bit RGB) over the validation set.

        Each rank scores a contiguous share of the validation photos; the sums are reduced.
        """
        if len(self.val_idx) == 0:
            return float("nan"), float("nan")
        share = np.array_split(self.val_idx, self.world.size)[self.world.rank]
        losses, psnrs = [], []
        for start in range(0, len(share), batch_size):
            idx = share[start:start + batch_size]
            L, ab_true = self._validation_pair(idx)
            ab_pred = self.predict_scaled_ab(L)
            losses.append(float(np.mean((ab_pred - ab_true) ** 2)) * len(idx))
            pred_rgb, true_rgb = lab_to_rgb_batch(L, ab_pred), lab_to_rgb_batch(L, ab_true)
            psnrs += [psnr(np.round(p * 255), np.round(t * 255)) for p, t in zip(pred_rgb, true_rgb)]
        loss_total, psnr_total, count = self.world.sum([sum(losses), np.sum(psnrs), len(psnrs)])
        return float(loss_total) / len(self.val_idx), float(psnr_total / count)

    def _validation_pair(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lightness and ab of photos `idx`, their central size x size crop when stored larger."""
        size = self.cfg.size
        return center_crop(self.lightness[idx], size), center_crop(self.ab[idx], size)

    def write_preview(self) -> None:
        idx = self.val_idx[:PREVIEW_IMAGES] if len(self.val_idx) else np.unique(self.train_idx)[:PREVIEW_IMAGES]
        L, ab_true = self._validation_pair(idx)
        ab_pred = self.predict_scaled_ab(L)
        gray = lab_to_rgb_batch(L, np.zeros_like(ab_true))
        truth, pred = lab_to_rgb_batch(L, ab_true), lab_to_rgb_batch(L, ab_pred)
        self.folder.write_preview(side_by_side(list(zip(gray, truth, pred))), zoom=max(1, 128 // self.cfg.size))

    def run(self) -> dict:
        """Train up to cfg.epochs; returns the last epoch's history row (empty if nothing to do)."""
        cfg = self.cfg
        if self.world.is_root:
            self.folder.clean()
        self._stop_signal = None
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < cfg.epochs:
                self._run_epoch()
                if self.epoch < cfg.epochs and self._stop_requested():
                    raise TrainingStopped(f"interrupted after epoch {self.epoch}; checkpoint saved: "
                                          f"continue with --resume {self.out}", 130)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return cfg.history[-1] if cfg.history else {}

    def _request_stop(self, signum, frame) -> None:
        """SIGINT (Ctrl-C) or SIGTERM: finish the current step, save, stop; a second one stops at once."""
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived (on any rank: all ranks must stop at the same step)."""
        asked = self._stop_signal is not None
        if self.world.size == 1:
            return asked
        return bool(self.world.sum([float(asked)])[0] > 0)

    def _take_losses(self, pending: list, bar) -> None:
        """Read the losses of the last len(pending) steps back to the host (one sync), stop if one
        is not finite, add them to the epoch's sum and show the running mean; empties `pending`."""
        if not pending:
            return
        on_host = all(isinstance(v, (float, np.floating)) for v in pending)  # CPU, or reduced over MPI
        values = pending if on_host else backend.to_numpy(backend.xp.stack(pending))
        first = self.step - len(pending) + 1
        for i, loss in enumerate(values):
            if not math.isfinite(loss):
                raise self._diverged(f"loss is {loss} at epoch {self.epoch + 1}, step {first + i}")
        self.loss_sum += float(sum(float(v) for v in values))
        bar.set_postfix(loss=f"{self.loss_sum / self.step:.5f}")
        bar.update(len(pending))
        pending.clear()

    def _weights_finite(self) -> bool:
        """Whether every parameter is finite, read back as one value."""
        xp = backend.xp
        return bool(xp.stack([xp.isfinite(p).all() for layer in self.model.param_layers
                              for p in layer.params.values()]).all())

    def _diverged(self, what: str) -> TrainingStopped:
        kept = (f"the last good checkpoint is kept in {self.checkpoint_path}" if self.checkpoint_path.exists()
                else "no checkpoint was saved yet")
        return TrainingStopped(f"training diverged: {what}; {kept} (try a lower --lr)", 1)

    def _run_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        plan = epoch_plan(len(self.train_idx), cfg.batch_size, cfg.seed, epoch)
        offsets = crop_offsets(len(self.train_idx), cfg.crop_margin, cfg.seed, epoch) if cfg.crop_margin else None
        shard_size = cfg.batch_size // self.world.size
        shard = slice(self.world.rank * shard_size, (self.world.rank + 1) * shard_size)  # this rank's share
        started, cpu_started = time.time(), time.process_time()
        bar = progress_bar(len(plan), f"epoch {epoch + 1}/{cfg.epochs}", "batches", self.progress, initial=self.step)
        sync_every = 1 if backend.xp is np else SYNC_EVERY_ON_DEVICE
        pending: list = []  # losses of the steps since the last read back to the host
        for step, (positions, flips) in enumerate(plan[self.step:], start=self.step):
            self.on_step(epoch + 1, self.step)
            if self._stop_requested():  # checked between steps, so every update is whole
                self._take_losses(pending, bar)
                bar.close()
                self.cpu_seconds += time.process_time() - cpu_started
                if not self._weights_finite():
                    raise self._diverged(f"the weights are NaN or infinite at epoch {epoch + 1}, step {self.step}")
                if self.world.is_root:
                    self.save_checkpoint()
                raise TrainingStopped(f"interrupted at epoch {epoch + 1}, step {self.step}; checkpoint saved: "
                                      f"continue with --resume {self.out}", 130)
            global_step = epoch * len(plan) + step
            self.optimizer.lr = scheduled_lr(cfg.lr, global_step, cfg.epochs * len(plan), cfg.schedule, cfg.warmup)
            crops = None if offsets is None else offsets[step * cfg.batch_size:(step + 1) * cfg.batch_size][shard]
            L, ab_true = make_batch(self.lightness, self.ab, self.train_idx[positions[shard]], flips[shard],
                                    crops, cfg.size)
            pending.append(self.train_step(backend.xp.asarray(L, dtype=self.dtype),
                                           backend.xp.asarray(ab_true, dtype=self.dtype), global_step))
            self.step += 1
            if len(pending) == sync_every:
                self._take_losses(pending, bar)
        self._take_losses(pending, bar)
        bar.close()
        if not self._weights_finite():  # the last step's update is seen by no loss
            raise self._diverged(f"the weights are NaN or infinite at epoch {epoch + 1}, step {self.step}")
        scores = self.validate() if len(self.val_idx) else None  # None: no validation set, no scores
        self.cpu_seconds += float(self.world.sum([time.process_time() - cpu_started])[0])  # all ranks' CPU
        row = {"epoch": epoch + 1, "train_loss": round(self.loss_sum / max(self.step, 1), 6),
               "val_loss": round(scores[0], 6) if scores else None,
               "val_psnr": round(scores[1], 3) if scores else None, "seconds": round(time.time() - started, 1)}
        if self.gan is not None:  # both networks' adversarial losses, for the log and curves.png
            row.update(self.gan.take_loss_means(self.step))
        cfg.history.append(row)
        self.epoch, self.step, self.loss_sum = epoch + 1, 0, 0.0
        if not self.world.is_root:
            return
        self.save_checkpoint()
        self.folder.save_model(self.model, train_size=cfg.size, epochs=self.epoch, cpu_seconds=round(self.cpu_seconds, 1))
        self.write_preview()
        self.folder.write_log(cfg.history)
        if not self.folder.write_curves(cfg.history) and self.progress and len(cfg.history) == 1:
            tqdm.write("no curves.png: matplotlib is not installed (pip install 'nanocolor[plots]')")
        if self.progress:
            val = f"val loss {row['val_loss']:.5f}  val PSNR {row['val_psnr']:.2f} dB  " if scores else ""
            tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.5f}  {val}"
                       f"({row['seconds']:.0f} s)")

