"""CPU threads for the fast engine: a small pool of workers over which GEMMs and copies are
split, every piece running single-threaded BLAS, and the cutting of a layer's work into pieces
(`pieces`, `run_pieces`, `map_rows`).

Why not let OpenBLAS thread each GEMM itself: it splits a GEMM statically between its threads
and keeps idle threads spinning for ~0.1 s after every call. When other processes compete for
the cores, each call waits for its slowest (descheduled) thread, and the spinning threads take
the core away from NumPy's single-threaded elementwise work between GEMMs: a training step was
measured 1.8x slower with 2 OpenBLAS threads than with 1 on a shared 2-core machine. Pieces
handed out on demand keep whichever cores are free busy, and idle workers sleep.

The pool has as many threads as NumPy's OpenBLAS was started with (OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS), so the thread budget is unchanged; OpenBLAS itself is then set to 1 thread.
The caller of `run` is one of them: it does the first job itself while helper threads do the
others, woken and awaited through bare locks (a training step makes some 60 such calls: a
thread-pool executor's futures and queue cost 60 us per call, these 15-20 us).
Without NumPy's bundled OpenBLAS, or with `enable(False)`, everything runs on the calling thread
and BLAS keeps its own threading.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from typing import Callable

import numpy as np

_state: dict = {"enabled": True, "workers": None, "pool": None, "blas_single": False, "generation": 0}
_local = threading.local()


def _openblas_thread_control():
    """(get_num_threads, set_num_threads, threads at start) of the OpenBLAS in NumPy's wheel, or None."""
    if "control" not in _state:
        _state["control"] = None
        for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                                   ("openblas", "")):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    _state["control"] = (get, set_, get())
                    break
            if _state["control"] is not None:
                break
    return _state["control"]


def keep_large_arrays_in_heap() -> bool:
    """Ask glibc to serve allocations up to 1 GiB from its heap instead of fresh mmap()s.

    By default every NumPy array over 32 MiB is a new mapping whose pages the kernel must
    zero on first touch, and a training step makes hundreds of them: measured 15-20% of an
    inference pass at 128x128 batch 16. Freed heap memory is then kept for the next step.
    Returns whether the setting took (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def workers() -> int:
    """Threads that `run` spreads work over (1: everything on the calling thread)."""
    if not _state["enabled"]:
        return 1
    if _state["workers"] is None:
        control = _openblas_thread_control()
        set_workers(control[2] if control is not None else 1)
        keep_large_arrays_in_heap()
    return _state["workers"]


def set_workers(threads: int) -> None:
    """Use `threads` workers from now on (by default as many as OpenBLAS was started with).

    With more than one, OpenBLAS (when its thread count can be set) runs single-threaded;
    with one, it gets its starting thread count back.
    """
    threads = max(int(threads), 1)
    control = _openblas_thread_control()
    if _state["pool"] is not None:
        _state["pool"].shutdown()
        _state["pool"] = None
    _state["generation"] += 1
    if threads > 1:
        _state["pool"] = _Pool(threads - 1)
    if control is not None:
        control[1](1 if threads > 1 else control[2])
    _state["workers"] = threads
    _state["blas_single"] = control is not None and (threads > 1 or control[2] == 1)


class _Helper:
    """A thread that runs job(slot) each time its `start` lock is released, then releases `done`."""

    def __init__(self, slot_index: int):
        self.slot, self.job, self.error = slot_index, None, None
        self.start, self.done = threading.Lock(), threading.Lock()
        self.start.acquire()
        self.done.acquire()
        self.thread = threading.Thread(target=self._loop, name=f"nanocolor-{slot_index}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.start.acquire()
            if self.job is None:  # shut down
                return
            try:
                self.job(self.slot)
            except BaseException as error:  # handed to the caller of run
                self.error = error
            self.done.release()


class _Pool:
    """Helper threads for worker slots 1, 2, ...; the thread that calls `map` is slot 0."""

    def __init__(self, helpers: int):
        self.lock = threading.Lock()  # one `map` at a time: callers on other threads wait their turn
        self.helpers = [_Helper(i + 1) for i in range(helpers)]

    def map(self, job: Callable[[int], None], n_jobs: int) -> None:
        """job(0), ..., job(n_jobs - 1) side by side, job(0) on the calling thread."""
        with self.lock:
            used = self.helpers[:n_jobs - 1]
            for helper in used:
                helper.job, helper.error = job, None
                helper.start.release()
            try:
                job(0)
            finally:
                for helper in used:
                    helper.done.acquire()
            for helper in used:
                if helper.error is not None:
                    raise helper.error

    def shutdown(self) -> None:
        with self.lock:
            for helper in self.helpers:
                helper.job = None
                helper.start.release()
            for helper in self.helpers:
                helper.thread.join()


def enable(on: bool = True) -> None:
    """Switch the pool on (default) or off (everything on the calling thread, BLAS as started)."""
    _state["enabled"] = bool(on)
    if not on and _state["workers"] is not None:
        set_workers(1)
        _state["workers"] = None


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's worker threads: it starts its own pool when needed."""
    _state["pool"], _state["workers"] = None, None
    _state["generation"] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def blas_single_threaded() -> bool:
    """Whether each BLAS call runs on one thread (many small GEMMs then cost no thread handoffs)."""
    if workers() == 1 and not _state["enabled"]:
        control = _openblas_thread_control()
        return control is not None and control[2] == 1
    return _state["blas_single"]


def slot() -> int:
    """0 .. workers()-1: which job of `run` the calling thread is doing, for per-worker partial
    sums and scratch (0 outside `run`, such as the caller when work runs inline)."""
    if getattr(_local, "generation", None) != _state["generation"]:
        return 0
    return _local.slot


def run(task: Callable[[int], None], n_tasks: int) -> None:
    """task(0), ..., task(n_tasks - 1), spread over the workers; returns when all are done.

    Tasks must write disjoint outputs and must not call `run` themselves. Task i belongs to job
    i % workers(), which runs its tasks in order as worker slot `job` (job 0 on the calling
    thread): per-slot partial sums then add up in the same order on every run, so results are
    bit-reproducible.
    """
    n_workers = workers()
    if n_workers == 1:
        for i in range(n_tasks):
            task(i)
        return

    def job(slot_index: int) -> None:
        saved = getattr(_local, "generation", None), getattr(_local, "slot", None)
        _local.generation, _local.slot = _state["generation"], slot_index
        try:
            for i in range(slot_index, n_tasks, n_workers):
                task(i)
        finally:
            _local.generation, _local.slot = saved

    _state["pool"].map(job, min(n_workers, n_tasks))


def split(n: int, pieces: int) -> list:
    """[(start, stop), ...]: range(n) cut into at most `pieces` near-equal non-empty parts."""
    pieces = max(1, min(pieces, n))
    bounds = [n * i // pieces for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------
# Cutting a layer's work into pieces: slices of the batch, or row bands of one image.

Piece = tuple  # (batch slice, row slice)


def slots(like) -> int:
    """Partial-sum slots a pass over array `like` needs: one per CPU worker for NumPy arrays, one
    on a GPU (where asking for the workers would start the CPU pool for nothing)."""
    return workers() if isinstance(like, np.ndarray) else 1


def pieces(N: int, rows: int, per_row: int, like, bands: bool = True, target: int = 4096) -> list[Piece]:
    """Cut N images of `rows` rows (of `per_row` pixels or tiles each) into (batch, rows) slice
    pieces of about `target` pixels for the CPU workers, at least two per worker when the work
    allows and a multiple of the workers (5 pieces on 2 workers leave one alone for the last:
    rounding up measured 2-11% faster steps): whole images, or with `bands` and fewer images
    than that, bands of one image's rows. Off the CPU, or with one worker, a single piece.
    """
    n_workers = slots(like)
    if n_workers == 1:
        return [(slice(0, N), slice(0, rows))]
    want = max(2 * n_workers, -(-N * rows * per_row // target))
    want = -(-want // n_workers) * n_workers
    if N >= min(want, 2 * n_workers) or not bands:
        return [(slice(a, b), slice(0, rows)) for a, b in split(N, want)]
    per_image = -(-want // N)
    return [(slice(n, n + 1), slice(a, b)) for n in range(N) for a, b in split(rows, per_image)]


def run_pieces(task: Callable[[slice, slice], None], work: list[Piece], like) -> None:
    """task(batch slice, row slice) for every piece, side by side on the CPU workers (NumPy), or
    on the calling thread (CuPy: one piece)."""
    if isinstance(like, np.ndarray):
        run(lambda i: task(*work[i]), len(work))
    else:
        for piece in work:
            task(*piece)


def map_rows(task: Callable[[slice, slice], None], N: int, rows: int, per_row: int, like) -> None:
    """task(batch slice, row slice) over pieces of N images x `rows` rows, for memory-bound work
    (pooling, upsampling, activations): bigger pieces than a GEMM's."""
    run_pieces(task, pieces(N, rows, per_row, like, target=1 << 16), like)


def map_elementwise(task: Callable, x) -> None:
    """task(index) over pieces of x's first two axes ((N, H, W, C) arrays), or once over all of x."""
    if x.ndim == 4:
        map_rows(lambda n, y: task((n, y)), x.shape[0], x.shape[1], x.shape[2], x)
    else:
        task(Ellipsis)
