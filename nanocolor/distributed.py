"""Data-parallel training over MPI (mpi4py): who am I, how many are we, and averaging gradients.

`init_world()` returns a World. Under `mpirun`/`mpiexec`/`srun` with mpi4py installed it wraps
MPI.COMM_WORLD; otherwise it is a single-process world with the same interface (rank 0, size 1,
every reduction the identity), so the training loop has one code path.

Every process holds the whole model. After backward, `GradientAverager.reduce_gradients` packs all
gradients (plus the shard's loss) into one flat buffer, allocated once, does one
Allreduce(SUM) on it and divides by the number of processes. CuPy gradients travel through
host memory: one device-to-host copy, the Allreduce on the host buffer, one copy back.
"""
from __future__ import annotations

import os

import numpy as np

from .backend import array_module

# Set in every process a launcher starts: Open MPI, MPICH/Intel MPI (Hydra) or Slurm PMI-2, PMIx.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class DistributedError(RuntimeError):
    """Started by an MPI launcher with several processes, but MPI cannot be used."""


class World:
    """The processes training one model. comm is an mpi4py communicator, or None for one process."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank = self.rank
        if comm is not None and self.size > 1:
            from mpi4py import MPI
            node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the processes on this machine
            self.local_rank = node.Get_rank()
            node.Free()

    @property
    def is_root(self) -> bool:
        """Rank 0 writes files and shows progress; the other ranks stay quiet."""
        return self.rank == 0

    def allreduce_sum_(self, buffer: np.ndarray) -> None:
        """Sum a contiguous host array over all processes, in place (nothing to do alone)."""
        if self.size > 1:
            from mpi4py import MPI
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

    def sum(self, values) -> np.ndarray:
        """Elementwise sum of a few host numbers over all processes, as float64 (a copy)."""
        buffer = np.array(values, dtype=np.float64)
        self.allreduce_sum_(buffer)
        return buffer

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"


def _launcher_env() -> tuple[int | None, int | None]:
    """(size, rank) as an MPI launcher announced them in the environment; None where unset."""
    size = next((int(os.environ[v]) for v in LAUNCHER_SIZE_VARS if os.environ.get(v, "").isdigit()), None)
    rank = next((int(os.environ[v]) for v in LAUNCHER_RANK_VARS if os.environ.get(v, "").isdigit()), None)
    return size, rank


def init_world() -> World:
    """The MPI world when started by an MPI launcher and mpi4py imports; else a one-process World.

    MPI is initialized only under a launcher, so a plain `python train.py` never touches it.
    Raises DistributedError when a launcher started several processes but mpi4py is missing:
    each would otherwise train alone and overwrite the others' files.
    """
    size, rank = _launcher_env()
    if size is None and rank is None:
        return World()
    try:
        from mpi4py import MPI
    except ImportError as err:
        if (size or 1) > 1 or (rank or 0) > 0:
            raise DistributedError(
                f"started by an MPI launcher as one of {size or 'several'} processes, but mpi4py "
                f"cannot be imported ({err}): pip install 'nanocolor[mpi]'") from None
        return World()
    return World(MPI.COMM_WORLD)


def use_local_gpu(world: World, xp) -> None:
    """With CuPy, give each process on a machine its own GPU (round-robin when there are fewer)."""
    if xp is np or world.size == 1:
        return
    count = xp.cuda.runtime.getDeviceCount()
    xp.cuda.Device(world.local_rank % count).use()


class GradientAverager:
    """Averages every layer's `grads` over the world with one Allreduce per step.

    The flat buffer holds all gradients in `layer.params` order, then a slot for each of the
    `losses` numbers of a step (1: the loss; a GAN's generator step has 2), so the global losses
    (the means over the ranks' equal shards) come with the same message. With
    CuPy the gradients are first gathered in a flat device buffer, copied to the host buffer,
    reduced there, and copied back (host memory, no CUDA-aware MPI needed).
    """

    def __init__(self, layers: list, world: World, losses: int = 1):
        self.world = world
        self.slots = [(layer.grads, name, layer.params[name].shape)
                      for layer in layers for name in layer.params]
        params = [layer.params[name] for layer in layers for name in layer.params]
        xp = array_module(params[0])
        dtype = np.result_type(*[p.dtype for p in params])
        self.n_grads = sum(int(p.size) for p in params)
        self.host = np.empty(self.n_grads + losses, dtype=dtype)       # grads..., losses...
        self.device = None if xp is np else xp.empty(self.n_grads, dtype=dtype)
        flat = self.host[:self.n_grads] if self.device is None else self.device
        self.views, offset = [], 0
        for _, _, shape in self.slots:
            n = int(np.prod(shape))
            self.views.append(flat[offset:offset + n].reshape(shape))
            offset += n

    @property
    def nbytes(self) -> int:
        """Bytes one process sends into the Allreduce each step."""
        return self.host.nbytes

    def reduce_gradients(self, loss):
        """Replace each grads[name] (in place) by its mean over all ranks; return the mean loss
        (`loss` is a number, or a tuple of `losses` numbers: then a tuple of their means)."""
        flat = self.host[:self.n_grads] if self.device is None else self.device
        xp = array_module(flat)
        xp.concatenate([grads[name].reshape(-1) for grads, name, _ in self.slots], out=flat)
        if self.device is not None:
            self.device.get(out=self.host[:self.n_grads])
        losses = loss if isinstance(loss, tuple) else (loss,)
        self.host[self.n_grads:] = [float(v) for v in losses]
        self.world.allreduce_sum_(self.host)
        self.host /= self.world.size
        if self.device is not None:
            self.device.set(self.host[:self.n_grads])
        for (grads, name, _), view in zip(self.slots, self.views):
            grads[name][...] = view
        means = tuple(float(v) for v in self.host[self.n_grads:])
        return means if isinstance(loss, tuple) else means[0]
