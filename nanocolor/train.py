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

from nanocolor import backend, engine, gan, options
from nanocolor.data import DataError, photo_record
from nanocolor.distributed import DistributedError, World, init_world, use_local_gpu
from nanocolor.model import ARCHS, DEFAULT_ARCH, DEFAULT_WIDTHS, full_config
from nanocolor.optim import SCHEDULES
from nanocolor.pipes import ends_quietly_on_closed_stdout
from nanocolor.runfolder import RunFolder
from nanocolor.serialize import CorruptFileError, load_npz
from nanocolor.trainer import LOSSES, TrainConfig, Trainer, TrainingStopped

# The photos bundled with a source checkout (data/sample beside the package), trained on by default.
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="FOLDER",
                   help="folder(s) of color photos, searched recursively; a Kaggle-style folder with "
                        "color/ and gray/ trains on color/ (default: the run's own folders with "
                        "--resume, else the bundled sample)")
    p.add_argument("--out", help="run folder for checkpoint, weights, log and preview: a new or empty "
                                 "folder outside the data folders (default: runs/<date-time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint, writing there (its settings are "
                        "kept; --epochs may extend it; --data may give its photos' new place)")
    p.add_argument("--epochs", type=int, default=None, help=f"total epochs to train (default {TrainConfig.epochs})")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"images per mini-batch (default {TrainConfig.batch_size}); under mpirun the global "
                        "batch, split evenly over the processes")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help=f"Adam's (peak) learning rate (default {TrainConfig.lr:g})")
    p.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule,
                   help="learning rate over the run: constant, or cosine from --lr down to 1%% of it at the "
                        f"last step of --epochs (default {TrainConfig.schedule})")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup,
                   help=f"steps of linear warm-up from 0 to --lr at the start (default {TrainConfig.warmup})")
    p.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss,
                   help="mse: regress a*b*; psnr: the same, scored per photo as evaluate scores it (the mean "
                        "over photos of log(the photo's MSE)): errors in photos that are otherwise right cost "
                        "more; classify: Zhang et al. 2016 color classes with rebalancing; "
                        "hybrid: both, an a*b* head and a class head on the same features, decoded half and "
                        f"half (default {TrainConfig.loss})")
    p.add_argument("--class-weight", type=float, default=TrainConfig.class_weight, metavar="W",
                   help="--loss hybrid: loss = MSE + W x the class head's cross-entropy "
                        f"(default {TrainConfig.class_weight:g})")
    p.add_argument("--rebalance", type=float, default=None, metavar="LAMBDA",
                   help="weigh each pixel by the rarity of its true color, w ~ 1 / ((1 - LAMBDA) p + LAMBDA / Q) "
                        "(Zhang et al.'s class rebalancing; p: the share of training pixels in the color's bin): "
                        "smaller LAMBDA, bolder rare colors; 1: no weighting (default 0.5 with --loss classify, "
                        "1 with mse)")
    p.add_argument("--chroma-match", type=float, default=TrainConfig.chroma_match, metavar="LAMBDA",
                   help="add LAMBDA x (RMS chroma of the prediction - RMS chroma of the truth)^2 per photo "
                        "to the MSE: the network learns how colorful each photo is, where MSE alone "
                        f"predicts dull means (default {TrainConfig.chroma_match:g}: plain MSE)")
    p.add_argument("--repeat", nargs="+", default=None, metavar="FOLDER=K",
                   help="the training photos under FOLDER (one inside --data) appear K times an epoch, to "
                        "weigh a kind of photo more; the validation split stays as it was")
    p.add_argument("--size", type=int, default=TrainConfig.size,
                   help=f"training images are center-cropped and resized to SIZE x SIZE (default {TrainConfig.size})")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="unet: BatchNorm and skip connections; seed: the plain autoencoder "
                        f"(default {DEFAULT_ARCH}, or that of the --init weights)")
    p.add_argument("--crop-margin", type=int, default=None,
                   help="photos are resized to SIZE + MARGIN and every batch takes random SIZE x SIZE crops "
                        "(default SIZE / 4; 0: the whole photo at SIZE)")
    p.add_argument("--widths", default=None,
                   help="channel widths of the encoder levels, comma-separated "
                        f"(default {','.join(map(str, DEFAULT_WIDTHS))}, or those of the --init weights; "
                        "the --init U-Net's widths and one more grow it a level, e.g. 32,64,128,256,256; "
                        "as many widths, none narrower, widen the --init net, e.g. 32,64,192,384,384)")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help=f"share of photos held out for validation (default {TrainConfig.val_fraction})")
    p.add_argument("--seed", type=int, default=TrainConfig.seed,
                   help=f"seed for init, split and batch order (default {TrainConfig.seed})")
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
    engine.add_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help=argparse.SUPPRESS)  # float64 parameters: only for exactness checks
    args = p.parse_args(argv)
    args.given = options.given_options(p, argv)  # what --resume must not ignore silently
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"train.py: warning: {message}", file=sys.stderr)  # one line, no source echo


@ends_quietly_on_closed_stdout
def main(argv=None, on_step=None) -> int:
    """train.py with the command line `argv` (default: sys.argv[1:]); returns the exit code.
    `on_step(epoch, step)` goes to the Trainer: tests use it to act at an exact moment of a run."""
    args = parse_args(argv)
    warnings.showwarning = _show_warning
    world = World()
    out = args.resume or args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until training starts: like Ctrl-C
    try:
        world = init_world()
        backend.use_device(args.device)
        engine.set_conv(args.conv)
        use_local_gpu(world, backend.xp)
        check_numbers(args)
        check_gan(args)
        if "class_weight" in args.given and args.loss != "hybrid" and not args.resume:
            raise ValueError("--class-weight only applies with --loss hybrid")
        arch, widths = _architecture(args)
        data = [str(Path(d).resolve()) for d in args.data] if args.data else \
            (None if args.resume else str(SAMPLE))
        cfg = TrainConfig(data=data, out=out, epochs=args.epochs or TrainConfig.epochs, batch_size=args.batch_size,
                          lr=args.lr, schedule=args.schedule, warmup=args.warmup, size=args.size,
                          val_fraction=args.val_fraction, seed=args.seed, widths=widths, arch=arch,
                          crop_margin=args.crop_margin, loss=args.loss, rebalance=args.rebalance,
                          class_weight=args.class_weight, chroma_match=args.chroma_match,
                          repeat=parse_repeat(args.repeat), limit=args.limit,
                          init=args.init, progress=not args.quiet and world.is_root, gan=args.gan,
                          gan_lambda=args.gan_lambda, critic_lr=args.critic_lr, critic_warmup=args.critic_warmup,
                          critic_widths=options.parse_widths(args.critic_widths, "--critic-widths")
                          if args.critic_widths else gan.CRITIC_WIDTHS)
        if args.resume:
            resume_settings(cfg, args)
        options.check_outside(out, cfg.data)
        options.check_repeat(cfg.repeat, cfg.data)
        if world.is_root:  # before the photos are read
            if not args.resume:
                check_new_run_folder(out)
            options.check_output_folder(out)
        cfg.photos = cfg.photos or photo_record(options.folders(cfg.data))
        trainer = Trainer(cfg, resume=bool(args.resume), world=world, dtype=args.dtype, on_step=on_step)
        last = trainer.run()
    except BrokenPipeError:
        raise  # a closed stdout: the wrapper ends quietly, the last checkpoint kept
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
    score = f"val PSNR {last['val_psnr']} dB" if last.get("val_psnr") is not None else \
        f"train loss {last.get('train_loss')}"  # a run without a validation set
    print(f"done: {cfg.epochs} epochs, {score}; weights in {Path(out) / 'model.npz'}")
    return 0


def parse_repeat(values: list[str] | None) -> dict | None:
    """--repeat FOLDER=K ... -> {absolute folder: K}; ValueError naming a malformed one."""
    if not values:
        return None
    repeat = {}
    for value in values:
        folder, _, count = value.rpartition("=")
        if not folder or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--repeat {value}: give FOLDER=K with K a whole number >= 1")
        repeat[str(Path(folder).resolve())] = int(count)
    return repeat


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
    options.check_number("--rebalance", args.rebalance, low=0, high=1, above=True)
    options.check_number("--chroma-match", args.chroma_match, low=0)
    options.check_number("--class-weight", args.class_weight, low=0, above=True)
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


def check_new_run_folder(out: str) -> None:
    """A new run goes into a folder train.py creates, or an empty one: never over the user's files."""
    folder = RunFolder(out)
    if folder.checkpoint.exists():
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    found = folder.other_entries()
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(f"{out} already holds files ({shown}) and no run of train.py: pick a new or empty --out")


def check_resume_options(args: argparse.Namespace) -> None:
    """--resume continues a run where it is, from its own weights: --out elsewhere and --init are refused."""
    if args.init:
        raise ValueError(f"--init and --resume do not go together: --resume {args.resume} continues that run "
                         f"from its checkpoint; --init starts a new run from other weights")
    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} with --resume {args.resume}: a run is continued in its own folder "
                         f"(to branch it, copy {args.resume} to {args.out} and resume the copy)")


def resume_settings(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """--resume continues the run with its own settings: its epoch count unless --epochs is
    given, its data folders (or their new place, --data); options that the run cannot change
    are named in one warning."""
    check_resume_options(args)
    stored, done = options.run_settings(cfg.out)
    wanted = {key: getattr(cfg, key) for key, _ in options.RUN_SETTINGS if key in args.given}
    ignored = options.ignored_on_resume(wanted, stored)
    if ignored:
        warnings.warn(f"--resume continues {cfg.out} with its own settings; ignored: {', '.join(ignored)}")
    cfg.epochs = args.epochs or stored.get("epochs", cfg.epochs)
    if cfg.epochs < done:
        raise ValueError(f"{cfg.out} has already trained {done} epochs: --epochs {cfg.epochs} leaves nothing "
                         f"to do (give more than {done} to train on)")
    cfg.data = run_data(cfg, stored) if "data" in args.given else stored_data(cfg.out, stored)
    cfg.photos = stored.get("photos")


def stored_data(run: str, stored: dict) -> list[str]:
    """The run's own data folders; DataError saying what to do when they are gone."""
    data = options.folders(stored.get("data"))
    missing = [folder for folder in data if not Path(folder).is_dir()]
    if missing:
        raise DataError(f"the photos of {run} are no longer in {missing[0]}: if they moved, give their "
                        f"new place with --resume {run} --data FOLDER")
    return data


def run_data(cfg: TrainConfig, stored: dict) -> list[str]:
    """The --data given on --resume: the run's folders, or their new place if it holds the same
    photos (count, names and sizes, as far as the checkpoint recorded them; said in a warning)."""
    data, old = options.folders(cfg.data), options.folders(stored.get("data"))
    if data == old:
        return data
    record, now = stored.get("photos"), photo_record(data)
    shown, was = ", ".join(data), ", ".join(old)
    if record is None:
        warnings.warn(f"--resume reads the photos of {cfg.out} from {shown} instead of {was}; its checkpoint does "
                      f"not record them, so make sure they are the same ({now['count']} image files)")
    elif now != record:
        raise DataError(f"--data {shown} holds {now['count']} image files that are not the {record['count']} "
                        f"{cfg.out} was trained on (in {was}; names or sizes differ): --resume needs the same "
                        f"photos")
    else:
        warnings.warn(f"--resume reads the photos of {cfg.out} from their new place, {shown}: the same "
                      f"{now['count']} image files (names and sizes) as were in {was}")
    return data


def _architecture(args: argparse.Namespace) -> tuple[str, tuple]:
    """--arch and --widths as given; what is not given comes from the --init weights, else the defaults."""
    config = {"arch": DEFAULT_ARCH, "widths": DEFAULT_WIDTHS}
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
