"""Fit a kind head beside a trained net: what kind of photo it colorizes, and how much color each kind gets.

One chroma gain for all photos cannot suit them all: the net's faces can take more color before
they lose faithfulness than its clothes or its beaches can. A kind head (model.KindHead) reads
the mean of every channel of the encoder's maps and predicts the photo's kind; each kind has a
gain, a factor on the file's chroma gain.

The kinds are the subfolders of the --data folders (faces, indoor, forest, ...); every other
weight stays as it is, so the head is a softmax regression on fixed features, computed once for
up to --per-kind training photos of each kind, at the work size colorizing uses (the split that
train.py holds out with the same --val-fraction and --seed is left out). Fitting leaves every
kind at gain 1; the gains are chosen on the validation photos (bench/kind_gains.py) and set with
--gain KIND=G, here or in a second call without --data:
    python -m nanocolor.kindhead --weights nanocolor/weights/colornet.npz \\
        --data $D/mixed128/train $D/scenes150/train --out kinds.npz
    python -m nanocolor.kindhead --weights kinds.npz --gain faces=1.15 --gain indoor=1.5 --out chosen.npz
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import backend, options
from .classify import SoftmaxCrossEntropy
from .color import scale_lightness
from .data import DataError, load_dataset, read_photo, split_indices
from .infer import (DEFAULT_WEIGHTS, check_work_size, full_lightness, load_colorizer, weights_file,
                    working_lightness)
from .layers import Linear
from .model import ColorNet
from .optim import Adam
from .progress import progress_bar
from .serialize import load_npz


def kind_of(path: str | os.PathLike, roots: list) -> str:
    """A photo's kind: the subfolder of its --data folder it lies in (that folder's own name for a
    photo directly in it)."""
    path = Path(os.path.abspath(path))  # not resolved: a folder of links to photos elsewhere keeps its kinds
    for root in (Path(os.path.abspath(r)) for r in roots):
        if root in path.parents:
            parts = path.relative_to(root).parts
            return parts[0] if len(parts) > 1 else root.name
    raise ValueError(f"{path} lies in none of {roots}")


def pooled_features(model: ColorNet, paths: list, work_size: int, progress: bool = True) -> np.ndarray:
    """Photos -> (N, w0 + ... + wd): what the kind head reads, each photo at the work size."""
    rows = []
    bar = progress_bar(len(paths), "features", "photos", progress)
    for path in paths:
        rgb, _ = read_photo(path)
        small = working_lightness(model, full_lightness(rgb, np.float64), work_size)
        model.encode(backend.xp.asarray(scale_lightness(small)[None, ..., None], dtype=np.float32))
        rows.append(backend.to_numpy(model.kind_head.pooled(model.encoded))[0])
        bar.update(1)
    bar.close()
    return np.stack(rows).astype(np.float64)


def fit_kind_head(model: ColorNet, features: np.ndarray, kinds: np.ndarray, epochs: int = 300, lr: float = 0.05,
                  l2: float = 1e-3) -> list[float]:
    """Fit model.kind_head.linear to the photos' kinds (N,) (indices into its kinds) from their
    features (N, F): cross-entropy plus l2 x |W|^2 / 2, full-batch Adam. Returns the cross-entropy at
    each epoch. The features are standardized while fitting (Adam sees every input on one scale) and
    the scaling is folded back into W and b, so the layer computes the same logits."""
    linear = model.kind_head.linear
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-3
    inputs = (features - mean) / std
    targets = np.eye(len(model.kind_head.kinds))[kinds]
    fit = Linear(inputs.shape[1], targets.shape[1], dtype=np.float64)
    fit.params["W"][:] = 0.0  # a convex problem: start at zero, the same fit every time
    optimizer, loss, losses = Adam([fit], lr=lr), SoftmaxCrossEntropy(), []
    for _ in range(epochs):
        losses.append(float(loss.forward(fit.forward(inputs), targets)))
        fit.backward(loss.backward())
        fit.grads["W"] = fit.grads["W"] + l2 * fit.params["W"]
        optimizer.step()
    W = fit.params["W"] / std[:, None]  # (x - mean) / std @ W = x @ (W / std) - mean @ (W / std)
    linear.params["W"] = backend.xp.asarray(W, dtype=linear.params["W"].dtype)
    linear.params["b"] = backend.xp.asarray(fit.params["b"] - mean @ W, dtype=linear.params["b"].dtype)
    return losses


def parse_gains(items: list) -> dict:
    """['faces=1.15', ...] -> {'faces': 1.15, ...} (ValueError for a malformed one)."""
    gains = {}
    for item in items or ():
        kind, _, value = item.partition("=")
        try:
            gains[kind] = float(value)
        except ValueError:
            raise ValueError(f"--gain {item!r}: give KIND=GAIN, e.g. faces=1.15") from None
        options.check_number(f"--gain {kind}", gains[kind], low=0, high=10, above=True, below=True)
    return gains


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="the trained net (default: the shipped model)")
    p.add_argument("--out", required=True, help="where to write the net with its kind head (a new file)")
    p.add_argument("--data", nargs="+", default=None,
                   help="folders of color photos, one subfolder per kind (the net's training photos); "
                        "without it, only the gains of a file that has a kind head change")
    p.add_argument("--per-kind", type=int, default=300, help="training photos of each kind to fit on (default 300)")
    options.add_split_options(p, "the size train.py trained at, for its split")
    p.add_argument("--work-size", type=int, default=None, help="the size photos are seen at (default: the file's)")
    p.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    p.add_argument("--l2", type=float, default=1e-3, help="weight decay of the fit (default 1e-3)")
    p.add_argument("--gain", action="append", metavar="KIND=G",
                   help="the chroma gain factor of one kind (repeat; the others keep theirs: 1 when fitted)")
    p.add_argument("--chroma-gain", type=float, default=None,
                   help="the file's chroma gain, which the kinds' gains multiply (default: the file's)")
    p.add_argument("--device", default=None, help="where the features are computed: cpu or gpu (CuPy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *rest, **kw: print(f"kindhead: warning: {message}", file=sys.stderr)
    cpu_start = time.process_time()
    try:
        for name in ("per_kind", "size", "epochs"):
            options.check_number(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
        options.check_number("--crop-margin", args.crop_margin, low=0)
        options.check_number("--lr", args.lr, low=0, above=True)
        options.check_number("--l2", args.l2, low=0)
        options.check_number("--chroma-gain", args.chroma_gain, low=0, high=10, above=True, below=True)
        check_work_size(args.work_size)
        gains = parse_gains(args.gain)
        backend.use_device(args.device)
        options.check_new_file(args.out)
        model, work_size = load_colorizer(args.weights)
        _, meta = load_npz(weights_file(args.weights))
        work_size = args.work_size or work_size
        if args.data:
            _, _, paths = load_dataset(args.data, args.size + args.crop_margin, progress=not args.quiet,
                                       with_paths=True)
            train_idx, _ = split_indices(len(paths), args.val_fraction, args.seed)
            kinds = np.array([kind_of(paths[i], args.data) for i in train_idx])
            names = sorted(set(kinds))
            if len(names) < 2:
                raise DataError(f"{', '.join(args.data)}: a kind head needs photos of at least two kinds "
                                f"(subfolders), found {names}")
            rng = np.random.default_rng(args.seed)
            pick = np.concatenate([rng.permutation(np.flatnonzero(kinds == k))[:args.per_kind] for k in names])
            model.with_kind_head(names, seed=args.seed)
            features = pooled_features(model, [paths[train_idx[i]] for i in pick], work_size,
                                       progress=not args.quiet)
            labels = np.array([names.index(k) for k in kinds[pick]])
            losses = fit_kind_head(model, features, labels, args.epochs, args.lr, args.l2)
            cpu_seconds = round(time.process_time() - cpu_start, 1)  # this process's, all its threads
            meta["kind_head"] = {"data": [str(d) for d in args.data], "photos": int(len(pick)),
                                 "per_kind": args.per_kind, "epochs": args.epochs, "lr": args.lr, "l2": args.l2,
                                 "loss": round(losses[-1], 5), "cpu_seconds": cpu_seconds}
            if "cpu_seconds" in meta:  # the whole model's cost, as train.py counts it
                meta["cpu_seconds"] = round(meta["cpu_seconds"] + cpu_seconds, 1)
        elif model.kind_head is None:
            raise DataError(f"{args.weights}: it has no kind head; give --data to fit one")
        unknown = sorted(set(gains) - set(model.kind_head.kinds))
        if unknown:
            raise ValueError(f"--gain: no kind {', '.join(unknown)} (the kinds: {', '.join(model.kind_head.kinds)})")
        model.kind_head.gains = [gains.get(k, g) for k, g in zip(model.kind_head.kinds, model.kind_head.gains)]
        if args.chroma_gain is not None:
            model.chroma_gain = args.chroma_gain
        # what the file said of its training and work size stays; what save writes anew goes
        keep = {k: v for k, v in meta.items() if k not in ColorNet.SAVED_META}
        model.save(args.out, **{**keep, "work_size": work_size})
    except (ValueError, OSError, backend.DeviceError) as err:  # DataError, CorruptFileError are ValueErrors
        print(f"kindhead: error: {err}", file=sys.stderr)
        return 2
    gains_text = ", ".join(f"{k} {g:g}" for k, g in zip(model.kind_head.kinds, model.kind_head.gains))
    print(f"wrote {args.out}: chroma gain {model.chroma_gain:g} times, for each kind, {gains_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
