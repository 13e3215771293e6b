"""Fit a color-class head beside a trained net's a*b* head, and choose how colorizing blends them.

The a*b* head regresses the mean of a pixel's plausible colors: dull where the network is
unsure. A class head reads the same map and predicts a distribution over Zhang et al.'s color
bins (classify.py); its annealed mean at a temperature T leans towards the most likely color.
Colorizing paints w * regression + (1 - w) * annealed mean (classify.blended_ab).

Every other weight stays as it is, so the head is a softmax regression on fixed features: the
map the heads read is computed once for sampled pixels of the training photos (the split that
train.py holds out with the same --val-fraction and --seed is left out), their k x k patches
are the inputs, the soft-encoded true colors the targets, fitted by Adam.
    python -m nanocolor.classhead --weights nanocolor/weights/colornet.npz \\
        --data $D/mixed128/train $D/scenes150/train --out colornet-hybrid.npz
    python -m nanocolor.classhead --weights colornet-hybrid.npz --chroma-gain 1.1 --out other.npz
(the second: new decode settings only, for a file that has a class head).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np

from . import backend, options
from .classify import SoftmaxCrossEntropy, ab_bins, soft_encode
from .color import unscale_ab
from .data import DataError, center_crop, load_dataset, split_indices
from .infer import DEFAULT_WEIGHTS, weights_file
from .model import DECODE_DEFAULTS, ColorNet
from .optim import Adam, scheduled_lr
from .progress import progress_bar
from .serialize import CorruptFileError, load_npz


def patches_at(features: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """features (N, H, W, C), pixel positions rows, cols (N, P) -> their k x k patches (N * P, k*k*C),
    zero padded, in the (i, j, c) order of a conv's weights (k, k, C, F): patches @ W.reshape(-1, F)
    is the conv's output at those pixels."""
    pad = k // 2
    padded = np.pad(features, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n = np.arange(len(features))[:, None]
    return np.concatenate([padded[n, rows + i, cols + j] for i in range(k) for j in range(k)], axis=-1) \
        .reshape(-1, k * k * features.shape[-1])


def sample_pixels(model: ColorNet, lightness: np.ndarray, ab: np.ndarray, pixels: int, rng,
                  batch_size: int = 32, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scaled lightness (N, H, W, 1) and a*b* (N, H, W, 2) -> (patches (N * pixels, k*k*C) of the
    map the heads read, true a*b* (N * pixels, 2) in LAB units) at `pixels` random pixels per photo."""
    k = model.class_head.k
    inputs, targets = [], []
    bar = progress_bar(len(lightness), "features", "photos", progress)
    for start in range(0, len(lightness), batch_size):
        L, true_ab = lightness[start:start + batch_size], ab[start:start + batch_size]
        features = backend.to_numpy(model.features(backend.xp.asarray(L)))
        rows = rng.integers(0, L.shape[1], (len(L), pixels))
        cols = rng.integers(0, L.shape[2], (len(L), pixels))
        inputs.append(patches_at(features, rows, cols, k))
        targets.append(unscale_ab(true_ab[np.arange(len(L))[:, None], rows, cols].reshape(-1, 2)))
        bar.update(len(L))
    bar.close()
    return np.concatenate(inputs), np.concatenate(targets)


def fit_class_head(model: ColorNet, patches: np.ndarray, true_ab: np.ndarray, epochs: int = 15, lr: float = 2e-3,
                   batch_size: int = 4096, seed: int = 0, progress: bool = True) -> list[float]:
    """Fit model.class_head (a conv to Q bin logits) to soft-encoded targets at sampled pixels:
    cross-entropy of softmax(patches @ W + b), by Adam with a cosine decay. Returns each epoch's
    mean loss. The patches are standardized while fitting (Adam then sees every input on one
    scale) and the scaling is folded back into W and b, so the conv computes the same logits."""
    head, centers = model.class_head, ab_bins()
    mean, std = patches.mean(axis=0), patches.std(axis=0) + 1e-3
    inputs = ((patches - mean) / std).astype(np.float32)
    targets = soft_encode(true_ab.astype(np.float32), centers)
    W = np.zeros((inputs.shape[1], len(centers)), dtype=np.float32)
    # the standardized head, as Adam sees a layer: its params and grads dicts
    fit = SimpleNamespace(params={"W": W, "b": np.zeros(len(centers), np.float32)}, grads={"W": None, "b": None})
    optimizer, loss = Adam([fit], lr=lr), SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, len(inputs) // batch_size)
    means = []
    bar = progress_bar(epochs * steps_per_epoch, "fitting the class head", "steps", progress)
    for epoch in range(epochs):
        order, total = rng.permutation(len(inputs)), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            logits = inputs[idx] @ fit.params["W"] + fit.params["b"]
            total += float(loss.forward(logits, targets[idx]))
            d_logits = loss.backward()
            fit.grads["W"], fit.grads["b"] = inputs[idx].T @ d_logits, d_logits.sum(axis=0)
            optimizer.lr = scheduled_lr(lr, epoch * steps_per_epoch + step, epochs * steps_per_epoch, "cosine")
            optimizer.step()
            bar.update(1)
        means.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{means[-1]:.4f}")
    bar.close()
    W, b = fit.params["W"] / std[:, None], fit.params["b"]  # (x - mean) / std @ W = x @ (W / std) - mean @ (W / std)
    head.params["W"] = backend.xp.asarray(W.reshape(head.params["W"].shape), dtype=head.params["W"].dtype)
    head.params["b"] = backend.xp.asarray(b - mean @ W, dtype=head.params["b"].dtype)
    return means


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="the trained regression net (default: the shipped model)")
    p.add_argument("--out", required=True, help="where to write the net with its class head (a new file)")
    p.add_argument("--data", nargs="+", default=None,
                   help="folders of color photos to fit the head on (the net's training photos); "
                        "without it, only the decode settings of a file that has a class head change")
    options.add_split_options(p, "photos are loaded as train.py loads them, at size + --crop-margin, and "
                                 "their central size x size is used")
    p.add_argument("--photos", type=int, default=6000, help="training photos to sample (default 6000)")
    p.add_argument("--pixels", type=int, default=96, help="pixels sampled per photo (default 96)")
    p.add_argument("--epochs", type=int, default=15, help="passes over the samples (default 15)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate, decayed by a cosine (default 2e-3)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"annealed-mean temperature of the bins (default {DECODE_DEFAULTS['temperature']}, "
                        "or the file's)")
    p.add_argument("--regression-weight", type=float, default=None,
                   help="share w of the regressed a*b* in what colorizing paints, 0..1 "
                        f"(default {DECODE_DEFAULTS['regression_weight']}, or the file's)")
    p.add_argument("--chroma-gain", type=float, default=None,
                   help="the chroma gain stored with the weights (default: the file's)")
    p.add_argument("--device", default=None, help="where the features are computed: cpu or gpu (CuPy); "
                   "default $NANOCOLOR_DEVICE or cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *rest, **kw: print(f"classhead: warning: {message}", file=sys.stderr)
    cpu_start = time.process_time()
    try:
        for name in ("size", "photos", "pixels", "epochs"):
            options.check_number(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
        options.check_number("--crop-margin", args.crop_margin, low=0)
        options.check_number("--lr", args.lr, low=0, above=True)
        options.check_number("--temperature", args.temperature, low=0, high=10, above=True)
        options.check_number("--regression-weight", args.regression_weight, low=0, high=1)
        options.check_number("--chroma-gain", args.chroma_gain, low=0, high=10, above=True, below=True)
        backend.use_device(args.device)
        options.check_new_file(args.out)
        path = weights_file(args.weights)
        arrays, meta = load_npz(path)
        model = ColorNet.from_contents(arrays, meta, source=str(path))
        if model.config["head"] != "tanh":
            raise CorruptFileError(f"{path}: a class head sits beside an a*b* head; this net has "
                                   f"a {model.config['head']!r} head")
        if args.data:
            model.check_size((1, args.size, args.size, 1))
            lightness, ab = load_dataset(args.data, args.size + args.crop_margin, progress=not args.quiet)
            train_idx, _ = split_indices(len(lightness), args.val_fraction, args.seed)
            rng = np.random.default_rng(args.seed)
            pick = np.sort(rng.choice(train_idx, size=min(args.photos, len(train_idx)), replace=False))
            lightness, ab = center_crop(lightness[pick], args.size), center_crop(ab[pick], args.size)
            model = model.with_class_head(len(ab_bins()), seed=args.seed)
            patches, true_ab = sample_pixels(model, lightness, ab, args.pixels, rng, progress=not args.quiet)
            del lightness, ab
            losses = fit_class_head(model, patches, true_ab, args.epochs, args.lr, seed=args.seed,
                                    progress=not args.quiet)
            cpu_seconds = round(time.process_time() - cpu_start, 1)  # this process's, all its threads
            meta["class_head"] = {"data": [str(d) for d in args.data], "photos": int(len(pick)),
                                  "pixels": args.pixels, "epochs": args.epochs, "lr": args.lr,
                                  "losses": [round(x, 5) for x in losses], "cpu_seconds": cpu_seconds}
            if "cpu_seconds" in meta:  # the whole model's cost, as train.py counts it
                meta["cpu_seconds"] = round(meta["cpu_seconds"] + cpu_seconds, 1)
        elif model.class_head is None:
            raise DataError(f"{path}: it has no class head; give --data to fit one")
        for name in DECODE_DEFAULTS:
            value = getattr(args, name)
            if value is not None:
                model.decode[name] = value
        if args.chroma_gain is not None:
            model.chroma_gain = args.chroma_gain
        # what the file said of its training and work size stays; what save writes anew goes
        keep = {k: v for k, v in meta.items() if k not in ColorNet.SAVED_META}
        model.save(args.out, **keep)
    except (ValueError, OSError, backend.DeviceError) as err:  # DataError, CorruptFileError are ValueErrors
        print(f"classhead: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: decode temperature {model.decode['temperature']:g}, "
          f"regression weight {model.decode['regression_weight']:g}, chroma gain {model.chroma_gain:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
