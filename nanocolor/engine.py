"""Which code computes the network: the one place that picks an engine.

    im2col     the textbook: ColorNet.forward / backward, layer by layer (nanocolor/layers.py),
               every conv as im2col + one GEMM, on the calling thread only
    gemm       the fast engine (nanocolor/fast) with every conv as one GEMM per piece of work
    winograd   the fast engine, 3x3 convs on even sizes by Winograd F(2x2, 3x3)
    winograd4  the fast engine, 3x3 convs on sizes divisible by 4 by Winograd F(4x4, 3x3)
    auto       the fast engine, each conv by the algorithm measured fastest for its shape (default)

`--conv` picks the conv algorithm only: every fast choice runs the same blocks (BatchNorm with
its ReLU in one pass, BatchNorm folded into the conv in inference, work split over the CPU
workers). The fast engine is optional: without nanocolor/fast every choice runs the textbook.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from .model import ColorNet

CONVS = ("auto", "im2col", "gemm", "winograd", "winograd4")
_state = {"conv": "auto"}

try:
    from . import fast
except ImportError:  # the textbook alone: a tree without nanocolor/fast
    fast = None


def set_conv(name: str) -> None:
    """Compute networks with conv algorithm `name` (one of CONVS) from now on."""
    if name not in CONVS:
        raise ValueError(f"--conv must be one of {', '.join(CONVS)}, got {name!r}")
    _state["conv"] = name


def get_conv() -> str:
    return _state["conv"]


@contextmanager
def use_conv(name: str) -> Iterator[None]:
    """`with use_conv("im2col"): ...` runs the block with that choice, then restores the previous one."""
    previous = get_conv()
    set_conv(name)
    try:
        yield
    finally:
        set_conv(previous)


def uses_fast() -> bool:
    """Whether the fast engine computes networks (it is present and the choice is not the textbook)."""
    return fast is not None and _state["conv"] != "im2col"


def network(model):
    """What runs `model` (a ColorNet, or the GAN's critic) now: the model itself (the textbook),
    or a fast-engine runner of it.

    Either has the model's forward and backward (a ColorNet's also train() and eval()); a runner
    keeps its own caches, so the backward must go to the object whose forward ran.
    """
    if not uses_fast():
        return model
    return (fast.Network if isinstance(model, ColorNet) else fast.Critic)(model, _state["conv"])


def map_tasks() -> Callable[[Callable[[int], None], int], None]:
    """run(task, n): task(0) .. task(n - 1), over the fast engine's CPU workers, or in turn on
    the calling thread under the textbook (which touches no threads)."""
    return fast.parallel.run if uses_fast() else _in_turn


def _in_turn(task: Callable[[int], None], n: int) -> None:
    for i in range(n):
        task(i)


def add_options(parser) -> None:
    """--device and --conv, the options of every command that runs the network (where and how;
    backend.use_device(args.device) and set_conv(args.conv) apply them)."""
    parser.add_argument("--device", default=None, help="cpu or gpu (CuPy); default $NANOCOLOR_DEVICE or cpu")
    parser.add_argument("--conv", choices=CONVS, default="auto",
                        help="how convolutions are computed: im2col is the textbook code of nanocolor/layers.py "
                             "(layer by layer, one thread); gemm, winograd and winograd4 are the fast engine's "
                             "algorithms (nanocolor/fast); auto picks the fastest per conv (default)")
