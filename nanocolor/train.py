"""Train the nanocolor autoencoder on a folder of color photos.

With no arguments it trains on the sample photos bundled in data/sample. Examples:
    python train.py --data ~/photos --epochs 50 --out runs/photos
    python train.py --resume runs/photos --epochs 80      # continue (and extend) a run
    python train.py --init nanocolor/weights/colornet.npz --gan --lr 2e-4 --epochs 1 --out runs/gan
    mpirun -n 4 python train.py --data ~/photos --out runs/photos4   # data-parallel on 4 processes
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

from nanocolor import backend, fast, gan, options
from nanocolor.data import DataError
from nanocolor.distributed import DistributedError, World, init_world, use_local_gpu
from nanocolor.model import DEFAULT_WIDTHS, full_config
from nanocolor.optim import SCHEDULES
from nanocolor.serialize import CorruptFileError, load_npz
from nanocolor.trainer import TrainConfig, Trainer, TrainingStopped

# The photos bundled with a source checkout (data/sample beside the package), trained on by default.
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="FOLDER",
                   help="folder(s) of color photos, searched recursively; a Kaggle-style folder with "
                        "color/ and gray/ trains on color/ (default: the run's own folders with "
                        "--resume, else the bundled sample)")
    p.add_argument("--out", help="run folder for checkpoint, weights, log and preview "
                                 "(default: runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint (its settings are kept; "
                        "--epochs may extend it)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs to train (default 50)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per mini-batch (default 16); under mpirun the global batch, "
                        "split evenly over the processes")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning rate over the run: constant, or cosine from --lr down to 1%% of it at the "
                        "last step of --epochs (default constant)")
    p.add_argument("--warmup", type=int, default=0,
                   help="steps of linear warm-up from 0 to --lr at the start (default 0)")
    p.add_argument("--loss", choices=("mse", "classify"), default="mse",
                   help="mse: regress a*b*; classify: Zhang et al. 2016 color classes with rebalancing (default mse)")
    p.add_argument("--size", type=int, default=64,
                   help="training images are center-cropped and resized to SIZE x SIZE (default 64)")
    p.add_argument("--arch", choices=("unet", "seed"), default=None,
                   help="unet: BatchNorm and skip connections; seed: the plain autoencoder "
                        "(default unet, or that of the --init weights)")
    p.add_argument("--crop-margin", type=int, default=None,
                   help="photos are resized to SIZE + MARGIN and every batch takes random SIZE x SIZE crops "
                        "(default SIZE / 4; 0: the whole photo at SIZE)")
    p.add_argument("--widths", default=None,
                   help="channel widths of the encoder levels, comma-separated "
                        f"(default {','.join(map(str, DEFAULT_WIDTHS))}, or those of the --init weights)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of photos held out for validation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, split and batch order (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from these weights instead of random ones, e.g. to continue training "
                        "the shipped model (nanocolor/weights/colornet.npz) on your photos")
    p.add_argument("--gan", action="store_true",
                   help="adversarial fine-tuning of the --init weights: a PatchGAN critic on (L, ab) pairs, "
                        "generator loss = LAMBDA * MSE + the critic's binary cross-entropy (pix2pix)")
    p.add_argument("--gan-lambda", type=float, default=gan.LAMBDA, metavar="LAMBDA",
                   help=f"--gan: weight of the regression loss (default {gan.LAMBDA:g}, pix2pix's)")
    p.add_argument("--critic-lr", type=float, default=gan.CRITIC_LR,
                   help=f"--gan: the critic's Adam learning rate (default {gan.CRITIC_LR:g}, beta1 0.5: pix2pix's)")
    p.add_argument("--critic-warmup", type=int, default=gan.WARMUP, metavar="STEPS",
                   help=f"--gan: steps in which the critic learns but the generator trains on MSE alone "
                        f"(default {gan.WARMUP})")
    p.add_argument("--critic-widths", default=None,
                   help=f"--gan: channel widths of the critic's convs, comma-separated "
                        f"(default {','.join(map(str, gan.CRITIC_WIDTHS))})")
    p.add_argument("--conv", choices=fast.ENGINES, default="auto",
                   help="how layers are computed: im2col is the textbook code of nanocolor/layers.py; gemm and "
                        "winograd are the fast engine of nanocolor/fast; auto picks the fastest (default)")
    p.add_argument("--device", default=None,
                   help="cpu or gpu (CuPy); default $NANOCOLOR_DEVICE or cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help=argparse.SUPPRESS)  # float64 parameters: only for exactness checks
    args = p.parse_args(argv)
    args.given = options.given_options(p, argv)  # what --resume must not ignore silently
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"train.py: warning: {message}", file=sys.stderr)  # one line, no source echo


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = _show_warning
    world = World()
    out = args.resume or args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until training starts: like Ctrl-C
    try:
        world = init_world()
        backend.use_device(args.device)
        fast.set_engine(args.conv)
        use_local_gpu(world, backend.xp)
        check_numbers(args)
        check_gan(args)
        arch, widths = _architecture(args)
        data = [str(Path(d).resolve()) for d in args.data] if args.data else \
            (None if args.resume else str(SAMPLE))
        crop_margin = args.size // 4 if args.crop_margin is None else args.crop_margin
        cfg = TrainConfig(data=data, out=out, epochs=args.epochs or 50, batch_size=args.batch_size,
                          lr=args.lr, schedule=args.schedule, warmup=args.warmup, size=args.size, val_fraction=args.val_fraction, seed=args.seed,
                          widths=widths, arch=arch, crop_margin=crop_margin, loss=args.loss, limit=args.limit,
                          init=args.init, progress=not args.quiet and world.is_root, gan=args.gan,
                          gan_lambda=args.gan_lambda, critic_lr=args.critic_lr, critic_warmup=args.critic_warmup,
                          critic_widths=options.parse_widths(args.critic_widths, "--critic-widths")
                          if args.critic_widths else gan.CRITIC_WIDTHS)
        if not args.resume and (Path(out) / "checkpoint.npz").exists():
            raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
        if args.resume:
            resume_settings(cfg, args)
        if world.is_root:
            options.check_output_folder(out)  # before the photos are read
        trainer = Trainer(cfg, resume=bool(args.resume), world=world, dtype=args.dtype)
        last = trainer.run()
    except KeyboardInterrupt:
        print(f"train.py: {_rank_tag(world)}interrupted; nothing more was saved", file=sys.stderr)
        return 130
    except TrainingStopped as stop:
        if world.is_root:
            print(f"train.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except (backend.DeviceError, DataError, CorruptFileError, DistributedError, ValueError) as err:
        print(f"train.py: {_rank_tag(world)}error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, an unwritable or vanished folder: one line naming the path
        checkpoint = Path(out) / "checkpoint.npz"
        kept = f"; the last checkpoint, {checkpoint}, is kept" if checkpoint.is_file() else ""
        print(f"train.py: {_rank_tag(world)}error: {err.filename or out}: {err.strerror or err}{kept}",
              file=sys.stderr)
        return 2
    if not world.is_root:
        return 0
    print(f"done: {cfg.epochs} epochs, val PSNR {last.get('val_psnr', float('nan'))} dB; "
          f"weights in {Path(out) / 'model.npz'}")
    return 0


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in range, before anything is loaded (ValueError naming the option)."""
    options.check_number("--epochs", args.epochs, low=1)
    options.check_number("--batch-size", args.batch_size, low=1)
    options.check_number("--lr", args.lr, low=0, above=True)
    options.check_number("--warmup", args.warmup, low=0)
    options.check_number("--size", args.size, low=1)
    options.check_number("--val-fraction", args.val_fraction, low=0, high=1, below=True)
    options.check_number("--seed", args.seed, low=0)
    options.check_number("--limit", args.limit, low=1)
    options.check_number("--crop-margin", args.crop_margin, low=0)
    options.check_number("--gan-lambda", args.gan_lambda, low=0)
    options.check_number("--critic-lr", args.critic_lr, low=0, above=True)
    options.check_number("--critic-warmup", args.critic_warmup, low=0)


GAN_OPTIONS = (("gan_lambda", "--gan-lambda"), ("critic_lr", "--critic-lr"), ("critic_warmup", "--critic-warmup"),
               ("critic_widths", "--critic-widths"))


def check_gan(args: argparse.Namespace) -> None:
    """--gan fine-tunes trained weights (--init) with the regression loss; its options need it."""
    if args.resume:
        return  # the run's own settings
    if args.gan and not args.init:
        raise ValueError("--gan fine-tunes a trained model: give its weights with --init "
                         "(e.g. --init nanocolor/weights/colornet.npz)")
    if args.gan and args.loss != "mse":
        raise ValueError("--gan fine-tunes a regression model: it needs --loss mse")
    given = [option for dest, option in GAN_OPTIONS if dest in args.given]
    if given and not args.gan:
        raise ValueError(f"{', '.join(given)} only apply with --gan")


def resume_settings(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """--resume continues the run with its own settings: its epoch count unless --epochs is
    given, its data folders; options that the run cannot change are named in one warning."""
    stored = options.run_settings(cfg.out)
    wanted = {key: getattr(cfg, key) for key, _ in options.RUN_SETTINGS if key in args.given}
    ignored = options.ignored_on_resume(wanted, stored)
    if ignored:
        warnings.warn(f"--resume continues {cfg.out} with its own settings; ignored: {', '.join(ignored)}")
    cfg.epochs = args.epochs or stored.get("epochs", cfg.epochs)
    cfg.data = None  # the trainer reads the run's own data folders from its checkpoint


def _architecture(args: argparse.Namespace) -> tuple[str, tuple]:
    """--arch and --widths as given; what is not given comes from the --init weights, else the defaults."""
    config = {"arch": "unet", "widths": DEFAULT_WIDTHS}
    if args.init:
        config = full_config(load_npz(args.init)[1].get("config") or {})
    arch = args.arch or config["arch"]
    widths = options.parse_widths(args.widths) if args.widths else tuple(config["widths"])
    return arch, widths


def _rank_tag(world: World) -> str:
    """'' alone; 'rank 1: ' under MPI, where an error may hit only some processes."""
    return f"rank {world.rank}: " if world.size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
