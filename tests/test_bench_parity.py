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
    assert ColorNet(bench.REFERENCE_WIDTHS).num_params() == 3_099_714
    assert sum(p.numel() for p in bench.torch_reference_net().parameters()) == 3_099_714


def test_reference_forward_flops_match_the_measured_note():
    # performance notes: 0.92 GFLOP forward per 64x64 image, 3.68 at 128x128
    model = ColorNet(bench.REFERENCE_WIDTHS)
    assert bench.conv_flops_per_image(model, 64, 64) / 1e9 == pytest.approx(0.92, rel=0.01)
    assert bench.conv_flops_per_image(model, 128, 128) / 1e9 == pytest.approx(3.68, rel=0.01)


def test_float32_parity_reference_net():
    torch.set_num_threads(1)
    diffs = bench.check_parity(ColorNet(bench.REFERENCE_WIDTHS), bench.torch_reference_net(),
                               *bench.make_batch(16, 16, 2))
    assert len(diffs) == 1 + 2 * 8 + 1  # loss, W and b of 8 convs, the Adam update
    assert max(diffs.values()) < bench.PARITY_TOL_FLOAT32, diffs


@pytest.mark.parametrize("height, width, batch", [(16, 24, 3), (8, 8, 1)])
def test_float64_parity_is_tight(height, width, batch):
    torch.set_num_threads(1)
    model = ColorNet(SMALL_WIDTHS, seed=3, dtype=np.float64)
    diffs = bench.check_parity(model, bench.torch_reference_net(SMALL_WIDTHS),
                               *bench.make_batch(height, width, batch, dtype=np.float64, seed=4))
    assert max(diffs.values()) < 1e-10, diffs


def test_parity_check_detects_a_different_network():
    # the same weights through average instead of max pooling must not pass as equal
    net = bench.torch_reference_net(SMALL_WIDTHS)
    for i, module in enumerate(net):
        if isinstance(module, torch.nn.MaxPool2d):
            net[i] = torch.nn.AvgPool2d(2)
    diffs = bench.check_parity(ColorNet(SMALL_WIDTHS, dtype=np.float64), net,
                               *bench.make_batch(16, 16, 2, dtype=np.float64))
    assert diffs["conv0.W"] > 1e-3
