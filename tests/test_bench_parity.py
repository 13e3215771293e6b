"""nanocolor and PyTorch compute the same loss, gradients and Adam step (bench/bench.py's parity check).

Skipped when PyTorch is absent; torch appears only here and in bench/.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nanocolor.model import ColorNet  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent.parent / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SMALL_WIDTHS = (8, 16, 24, 32)


def test_reference_nets_have_the_issue_parameter_count():
    assert ColorNet(bench.REFERENCE_WIDTHS, arch="seed").num_params() == 3_099_714
    assert sum(p.numel() for p in bench.torch_reference_net().parameters()) == 3_099_714


def test_reference_forward_flops_match_the_measured_note():
    # performance notes: 0.92 GFLOP forward per 64x64 image, 3.68 at 128x128
    model = ColorNet(bench.REFERENCE_WIDTHS, arch="seed")
    assert bench.conv_flops_per_image(model, 64, 64) / 1e9 == pytest.approx(0.92, rel=0.01)
    assert bench.conv_flops_per_image(model, 128, 128) / 1e9 == pytest.approx(3.68, rel=0.01)


def test_float32_parity_reference_net():
    torch.set_num_threads(1)
    diffs = bench.check_parity(ColorNet(bench.REFERENCE_WIDTHS, arch="seed"), bench.torch_reference_net(),
                               *bench.make_batch(16, 16, 2))
    assert len(diffs) == 1 + 2 * 8 + 1  # loss, W and b of 8 convs, the Adam update
    assert max(diffs.values()) < bench.PARITY_TOL_FLOAT32, diffs


@pytest.mark.parametrize("height, width, batch", [(16, 24, 3), (8, 8, 1)])
def test_float64_parity_is_tight(height, width, batch):
    torch.set_num_threads(1)
    model = ColorNet(SMALL_WIDTHS, seed=3, dtype=np.float64, arch="seed")
    diffs = bench.check_parity(model, bench.torch_reference_net(SMALL_WIDTHS),
                               *bench.make_batch(height, width, batch, dtype=np.float64, seed=4))
    assert max(diffs.values()) < 1e-10, diffs


def test_parity_check_detects_a_different_network():
    # the same weights through average instead of max pooling must not pass as equal
    net = bench.torch_reference_net(SMALL_WIDTHS)
    for i, module in enumerate(net):
        if isinstance(module, torch.nn.MaxPool2d):
            net[i] = torch.nn.AvgPool2d(2)
    diffs = bench.check_parity(ColorNet(SMALL_WIDTHS, dtype=np.float64, arch="seed"), net,
                               *bench.make_batch(16, 16, 2, dtype=np.float64))
    assert diffs["conv0.W"] > 1e-3


def test_unet_twins_have_the_same_parameters():
    model = bench.nanocolor_net("unet")
    net = bench.torch_net("unet")
    assert sum(p.numel() for p in net.parameters()) == model.num_params()
    names = [name for name, *_ in bench.param_pairs(model, net)]
    assert names[:3] == ["conv0.W", "bn0.gamma", "bn0.beta"] and names[-2:] == ["conv7.W", "conv7.b"]


def test_float32_parity_unet():
    torch.set_num_threads(1)
    diffs = bench.check_parity(bench.nanocolor_net("unet"), bench.torch_net("unet"), *bench.make_batch(16, 16, 2))
    assert len(diffs) == 1 + 7 * 3 + 2 + 1 + 1  # loss; W, gamma, beta of 7 blocks; head W, b; Adam; eval output
    assert max(diffs.values()) < bench.PARITY_TOL_FLOAT32, diffs


@pytest.mark.parametrize("height, width, batch", [(16, 24, 3), (8, 8, 2)])
def test_float64_parity_unet_is_tight(height, width, batch):
    torch.set_num_threads(1)
    model = ColorNet(SMALL_WIDTHS, arch="unet", seed=3, dtype=np.float64)
    diffs = bench.check_parity(model, bench.torch_unet(SMALL_WIDTHS),
                               *bench.make_batch(height, width, batch, dtype=np.float64, seed=4))
    assert max(diffs.values()) < 1e-10, diffs


def test_unet_parity_detects_swapped_skip_channels_and_eval_mode_statistics():
    batch = bench.make_batch(16, 16, 2, dtype=np.float64)
    net = bench.torch_unet(SMALL_WIDTHS)
    net.up[0][1].momentum = 0.5  # running statistics collected differently: only eval mode differs
    diffs = bench.check_parity(ColorNet(SMALL_WIDTHS, arch="unet", dtype=np.float64), net, *batch)
    assert diffs["loss"] < 1e-10 and diffs["eval_output"] > 1e-3

    class Swapped(type(net)):
        def forward(self, x):  # concatenation as [skip, upsampled]
            skips = []
            for level in self.down:
                x = level(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for level, skip in zip(self.up, reversed(skips)):
                x = torch.cat([skip, torch.nn.functional.interpolate(level(x), scale_factor=2)], dim=1)
            return torch.tanh(self.head(x))

    swapped = bench.torch_unet(SMALL_WIDTHS)
    swapped.__class__ = Swapped
    diffs = bench.check_parity(ColorNet(SMALL_WIDTHS, arch="unet", dtype=np.float64), swapped, *batch)
    assert diffs["loss"] > 1e-3


def test_critic_twins_have_the_same_parameters_and_flops():
    model, net = bench.nanocolor_net("critic"), bench.torch_net("critic")
    assert sum(p.numel() for p in net.parameters()) == model.num_params() == 94_401
    names = [name for name, *_ in bench.param_pairs(model, net)]
    assert names == [f"conv{i}.{p}" for i in range(4) for p in "Wb"]
    # 64x64: 32x32 x 27 x 32, 16x16 x 288 x 64, 16x16 x 576 x 128, 16x16 x 1152 x 1 multiply-adds
    expected = 2 * (32 * 32 * 27 * 32 + 16 * 16 * 288 * 64 + 16 * 16 * 576 * 128 + 16 * 16 * 1152)
    assert bench.conv_flops_per_image(model, 64, 64) == expected


def test_float32_parity_critic():
    torch.set_num_threads(1)
    diffs = bench.check_parity(bench.nanocolor_net("critic"), bench.torch_net("critic"), *bench.make_batch(32, 32, 3))
    assert len(diffs) == 1 + 1 + 2 * 4 + 1  # loss, d/d ab, W and b of 4 convs, the Adam update
    assert max(diffs.values()) < bench.PARITY_TOL_FLOAT32, diffs


@pytest.mark.parametrize("height, width, batch", [(16, 16, 2), (20, 28, 3), (17, 23, 1)])
def test_float64_parity_critic_is_tight(height, width, batch):
    """Strided convs on odd sizes too: nanocolor's textbook code and PyTorch agree to rounding."""
    torch.set_num_threads(1)
    model = bench.PatchCritic((4, 6, 8), seed=3, dtype=np.float64)
    diffs = bench.check_parity(model, bench.torch_critic((4, 6, 8)),
                               *bench.make_batch(height, width, batch, dtype=np.float64, seed=4))
    assert max(diffs.values()) < 1e-10, diffs


def test_critic_parity_detects_another_padding():
    net = bench.torch_critic((4, 6, 8))
    net[2].padding = (0, 0)  # the second strided conv without its padding: other patches, other sizes
    net[6].padding = (2, 2)
    diffs = bench.check_parity(bench.PatchCritic((4, 6, 8), dtype=np.float64), net,
                               *bench.make_batch(32, 32, 2, dtype=np.float64))
    assert diffs["loss"] > 1e-3


def test_blas_line_names_the_kernel_and_warns_when_the_environment_forces_one(monkeypatch):
    for var in bench.BLAS_KERNEL_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    line, warning = bench.blas_line()
    kernel = bench.blas_kernel()
    assert line.startswith("BLAS: ") and warning is None
    if kernel["corename"] is None:
        pytest.skip("no OpenBLAS kernel name to read on this NumPy")
    assert kernel["corename"] in line
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    monkeypatch.setattr(bench, "native_blas_kernel", lambda: "Zen")
    _, warning = bench.blas_line()
    assert "OPENBLAS_CORETYPE=Prescott" in warning and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in warning


def test_bench_gpu_side_keeps_device_arrays_off_numpy(monkeypatch):
    # --device gpu under the CuPy stand-in (tests/fake_gpu.py), PyTorch on the CPU: the parity check
    # and the timed loop must read device arrays back explicitly, as CuPy demands
    import fake_gpu
    from nanocolor import backend
    fake_gpu.install(monkeypatch)
    torch.set_num_threads(1)
    backend.use_device("gpu")
    try:
        diffs = bench.check_parity(bench.nanocolor_net("unet"), bench.torch_net("unet"), *bench.make_batch(16, 16, 2))
        timings = bench.run_nanocolor(16, 16, 2, warmup=1, steps=1, device="gpu", net="unet")
    finally:
        backend.use_device("cpu")
    assert max(diffs.values()) < bench.PARITY_TOL_FLOAT32, diffs
    assert timings["train_s"] > 0 and timings["infer_s"] > 0 and "gpu_pool_mb" in timings
