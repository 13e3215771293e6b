"""Data-parallel scaling: training throughput on 1 and 2 MPI processes, and the Allreduce cost.

    python bench/bench_mpi.py                           # default model, 64x64, global batch 16
    python bench/bench_mpi.py --widths 64,128,256,512   # the reference model
    python bench/bench_mpi.py --json                    # one JSON object per process count

For each process count N (--procs, default 1,2) it launches `mpirun -n N` of this script, one
BLAS/OpenMP thread per process. Every process runs the training step of nanocolor.trainer on its
B/N share of a synthetic global batch B: forward, MSE loss, backward, one Allreduce of the flat
gradient buffer (N > 1), Adam. Rank 0 reports the median step time over --steps timed steps after
--warmup untimed ones, split into compute and Allreduce, and the median time of --reduce-repeats
bare Allreduces of the gradient buffer. Then it prints the ring-allreduce scaling model of
docs/distributed.md, fed with the measured compute time per image.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
REFERENCE_WIDTHS = (64, 128, 256, 512)   # the reference model of /docs and bench/bench.py
LINK_GBITS = (10, 25, 100)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="process counts to run, comma-separated (default 1,2)")
    p.add_argument("--widths", default="32,64,128,256", help="encoder widths (default: the default model)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (default 16)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--reduce-repeats", type=int, default=30, help="bare Allreduces timed (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object per process count")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set for the mpirun children
    return p.parse_args(argv)


# -- one process of an MPI job -----------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from nanocolor.distributed import GradientAverager, init_world
    from nanocolor.loss import MSELoss
    from nanocolor.model import ColorNet
    from nanocolor.optim import Adam

    world = init_world()
    widths = tuple(int(w) for w in args.widths.split(","))
    model = ColorNet(widths, seed=0)
    optimizer, loss_fn = Adam(model.param_layers), MSELoss()
    averager = GradientAverager(model.param_layers, world)
    shard = args.batch_size // world.size
    rng = np.random.default_rng(world.rank)
    lightness = rng.uniform(-1, 1, (shard, args.size, args.size, 1)).astype(np.float32)
    ab_true = rng.uniform(-0.3, 0.3, (shard, args.size, args.size, 2)).astype(np.float32)

    compute, reduce, total = [], [], []
    for step in range(args.warmup + args.steps):
        if world.comm is not None:
            world.comm.Barrier()  # start every rank's step together
        t0 = time.perf_counter()
        loss_fn.forward(model.forward(lightness), ab_true)
        model.backward(loss_fn.backward())
        t1 = time.perf_counter()
        if world.size > 1:
            averager.average(0.0)
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            compute.append(t1 - t0 + t3 - t2)
            reduce.append(t2 - t1)
            total.append(t3 - t0)
    # the slowest rank sets the pace: take each step's maximum over ranks
    times = np.array([compute, reduce, total], dtype=np.float64)
    if world.comm is not None and world.size > 1:
        from mpi4py import MPI
        world.comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)

    bare = []
    for _ in range(args.reduce_repeats if world.size > 1 else 0):
        world.comm.Barrier()
        t0 = time.perf_counter()
        world.allreduce_sum_(averager.host)
        bare.append(time.perf_counter() - t0)
    bare_max = np.array(bare or [float("nan")])
    if world.size > 1:
        from mpi4py import MPI
        world.comm.Allreduce(MPI.IN_PLACE, bare_max, op=MPI.MAX)

    if world.is_root:
        step_s = statistics.median(times[2])
        print("RESULT " + json.dumps({
            "procs": world.size, "widths": list(widths), "size": args.size, "batch_size": args.batch_size,
            "params": model.num_params(), "gradient_bytes": averager.nbytes,
            "step_ms": 1e3 * step_s, "compute_ms": 1e3 * statistics.median(times[0]),
            "reduce_in_step_ms": 1e3 * statistics.median(times[1]),
            "allreduce_ms": 1e3 * float(np.median(bare_max)), "images_per_s": args.batch_size / step_s,
        }), flush=True)


# -- the driver ---------------------------------------------------------------------------------

def mpirun_command() -> list[str]:
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = str(beside) if beside.exists() else shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench_mpi.py: no mpirun found: pip install 'nanocolor[mpi]'")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    return [mpirun] + (["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else [])


def run_procs(n: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{var: "1" for var in THREAD_ENV_VARS})
    env.pop("NANOCOLOR_DEVICE", None)
    forwarded = ["--widths", args.widths, "--size", str(args.size), "--batch-size", str(args.batch_size),
                 "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--reduce-repeats", str(args.reduce_repeats)]
    cmd = [*mpirun_command(), "-n", str(n), sys.executable, str(Path(__file__).resolve()), "--worker", *forwarded]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.exit(f"bench_mpi.py: mpirun -n {n} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def ring_allreduce_s(nbytes: float, n: int, gbit_per_s: float) -> float:
    """Bandwidth term of a ring allreduce: each process sends and receives 2(N-1)/N of the buffer."""
    return 2 * (n - 1) / n * nbytes / (gbit_per_s * 1e9 / 8)


def param_count(widths: tuple, kernel: int = 3) -> int:
    """Parameters of ColorNet(widths): the conv weights and biases, no model needed."""
    channels = [1, *widths, *reversed(widths[:-1]), 2]
    return sum(kernel * kernel * a * b + b for a, b in zip(channels, channels[1:]))


def print_model(one: dict, batch_size: int) -> None:
    ms_per_image = one["compute_ms"] / batch_size
    print(f"\nScaling model: compute {ms_per_image:.1f} ms per image (measured, N=1, 1 thread); "
          f"global batch {batch_size}; step = compute(B/N) + ring allreduce, no overlap")
    models = {tuple(one["widths"]): "this model", REFERENCE_WIDTHS: "reference model"}
    for widths, name in models.items():
        nbytes = 4 * param_count(widths)
        print(f"  {name} {widths}: {param_count(widths):,} params, {nbytes / 1e6:.2f} MB of float32 "
              f"gradients per step")
    nbytes = 4 * param_count(tuple(one["widths"]))
    header = "  N  compute/step" + "".join(f"  allreduce@{g}G  efficiency" for g in LINK_GBITS)
    print(header)
    for n in (2, 4, 8, 16, 32):
        if batch_size % n:
            continue
        compute = ms_per_image * batch_size / n
        cells = ""
        for g in LINK_GBITS:
            reduce = 1e3 * ring_allreduce_s(nbytes, n, g)
            cells += f"  {reduce:11.2f} ms  {compute / (compute + reduce):9.0%}"
        print(f"{n:3d}  {compute:9.1f} ms{cells}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = [run_procs(int(n), args) for n in args.procs.split(",")]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    r0 = results[0]
    print(f"model widths {r0['widths']} ({r0['params']:,} params, gradient buffer "
          f"{r0['gradient_bytes'] / 1e6:.2f} MB), {r0['size']}x{r0['size']}, global batch {r0['batch_size']}, "
          f"1 thread per process, medians of {args.steps} steps")
    print(f"{'N':>3}  {'images/s':>9}  {'step ms':>8}  {'compute ms':>10}  {'Allreduce+wait':>17}  "
          f"{'bare Allreduce ms':>17}  speedup")
    for r in results:
        print(f"{r['procs']:3d}  {r['images_per_s']:9.2f}  {r['step_ms']:8.1f}  {r['compute_ms']:10.1f}  "
              f"{r['reduce_in_step_ms']:14.2f} ms  {r['allreduce_ms']:17.3f}  "
              f"{r['images_per_s'] / r0['images_per_s']:6.2f}x")
    if r0["procs"] == 1:
        print_model(r0, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
