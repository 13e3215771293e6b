"""Side-by-side benchmark: nanocolor against PyTorch on the colorization networks and the GAN critic.

    python bench/bench.py                      # CPU, 2 threads, both configurations, a table
    python bench/bench.py --json --steps 3     # one JSON object per configuration
    python bench/bench.py --device gpu         # CuPy against PyTorch CUDA
    python bench/bench.py --conv im2col        # nanocolor's textbook code instead of the fast engine
    python bench/bench.py --nets critic --configs 64x64x32   # only the GAN's critic, 64x64 batch 32

Both sides run the same network from the same initial weights, in float32:
  reference  Conv 1->64, pool, 64->128, pool, 128->256, pool, 256->512, 512->256, up, 256->128,
             up, 128->64, up, 64->2 + tanh; 3x3, ReLU; 3,099,714 parameters
  unet       ColorNet(DEFAULT_WIDTHS, arch="unet"): Conv (no bias) + BatchNorm + ReLU blocks of
             widths 32, 64, 128, 256, skip connections by concatenation, Conv 64->2 + tanh;
             BatchNorm in training mode for training steps, in eval mode for inference
  critic     gan.PatchCritic(): the PatchGAN critic of `train.py --gan` on (L, ab) pairs, Conv 3x3
             stride 2, 3->32, 32->64, then stride 1, 64->128, 128->1, LeakyReLU 0.2 between; its
             training step is forward, the binary cross-entropy against "real", backward through
             to the input (the generator's step needs d/d ab) and Adam
Before any timing, one batch must give the same MSE loss and the same parameter gradients on
both sides (relative difference < 1e-3), or the run aborts.

The machine line names the OpenBLAS kernel NumPy runs (OPENBLAS_CORETYPE can force an older one
than the CPU supports: the table then warns; compare with `env -u OPENBLAS_CORETYPE -u
OPENBLAS_L2_SIZE python bench/bench.py`).

Each side is timed in its own subprocess (peak memory of one side never mixes with the other's)
with the same thread count: OMP/OpenBLAS/MKL variables are set before NumPy or PyTorch load.
Timings are medians over --steps timed steps after --warmup untimed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

if __name__ == "__main__":
    # BLAS reads its thread count once, when NumPy loads: set it before the first numpy import.
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--threads", type=int, default=2)
    _threads = str(_pre.parse_known_args()[0].threads)
    for _var in THREAD_ENV_VARS:
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from nanocolor import backend, engine  # noqa: E402
from nanocolor.gan import CRITIC_WIDTHS, SLOPE, PatchCritic  # noqa: E402
from nanocolor.layers import BatchNorm2d, Conv2d, MaxPool2d, Upsample2d, conv_output_size  # noqa: E402
from nanocolor.loss import BCEWithLogitsLoss, MSELoss  # noqa: E402
from nanocolor.model import DEFAULT_WIDTHS, ColorNet  # noqa: E402
from nanocolor.optim import Adam  # noqa: E402

REFERENCE_WIDTHS = (64, 128, 256, 512)
REFERENCE_PARAMS = 3_099_714
DEFAULT_CONFIGS = ("128x128x16", "64x64x32")  # height x width x batch
NETS = ("reference", "unet", "critic")
BLAS_KERNEL_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # override OpenBLAS's choice of kernel
PARITY_TOL_FLOAT32 = 1e-3
# Networks with BatchNorm are checked in float64: its backward subtracts two batch means from the
# gradient, and in float32 that cancellation leaves ~5e-3 relative differences between two
# correct implementations at 128x128 batch 16.
PARITY_TOL_FLOAT64 = 1e-8
LR = 1e-3


# ---------------------------------------------------------------------------------------------
# The two networks, the same weights, the same batch.

def parse_config(text: str) -> tuple[int, int, int]:
    """'128x128x16' -> (height, width, batch)."""
    try:
        height, width, batch = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"configuration {text!r} is not HEIGHTxWIDTHxBATCH") from None
    return height, width, batch


def make_batch(height: int, width: int, batch: int, dtype=np.float32, seed: int = 1):
    """Synthetic (lightness (N, H, W, 1), ab_true (N, H, W, 2)), both in [-1, 1], NumPy on the host."""
    rng = np.random.default_rng(seed)
    lightness = rng.uniform(-1, 1, (batch, height, width, 1)).astype(dtype)
    ab_true = (0.5 * rng.uniform(-1, 1, (batch, height, width, 2))).astype(dtype)
    return lightness, ab_true


def torch_reference_net(widths: tuple = REFERENCE_WIDTHS, kernel: int = 3):
    """The reference network in PyTorch (NCHW), written out independently of ColorNet."""
    from torch import nn
    conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    layers, c = [], 1
    for w in widths[:-1]:
        layers += [conv(c, w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    layers += [conv(c, widths[-1]), nn.ReLU(inplace=True)]
    c = widths[-1]
    for w in reversed(widths[:-1]):
        layers += [conv(c, w), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2, mode="nearest")]
        c = w
    layers += [conv(c, 2), nn.Tanh()]
    return nn.Sequential(*layers)


def torch_unet(widths: tuple = DEFAULT_WIDTHS, kernel: int = 3):
    """ColorNet(widths, arch="unet") in PyTorch (NCHW), written out independently of ColorNet:
    Conv (no bias) + BatchNorm + ReLU blocks, max-pool down, nearest upsample and concatenation
    of the encoder's map of that size ([upsampled, skip] along channels) up, Conv + tanh head."""
    import torch
    from torch import nn

    def block(c_in: int, c_out: int):
        return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            c, self.down = 1, nn.ModuleList()  # modules in the order of ColorNet.layers
            for w in widths[:-1]:
                self.down.append(block(c, w))
                c = w
            self.bottleneck = block(c, widths[-1])
            c, self.up = widths[-1], nn.ModuleList()
            for w in reversed(widths[:-1]):
                self.up.append(block(c, w))
                c = 2 * w
            self.head = nn.Conv2d(c, 2, kernel, padding=kernel // 2)

        def forward(self, x):
            skips = []
            for level in self.down:
                x = level(x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for level, skip in zip(self.up, reversed(skips)):
                x = nn.functional.interpolate(level(x), scale_factor=2, mode="nearest")
                x = torch.cat([x, skip], dim=1)
            return torch.tanh(self.head(x))

    return UNet()


def torch_critic(widths: tuple = CRITIC_WIDTHS):
    """gan.PatchCritic(widths) in PyTorch (NCHW, on the pair concatenated along channels)."""
    from torch import nn
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, stride=2 if i < len(widths) - 1 else 1, padding=1),
                   nn.LeakyReLU(SLOPE, inplace=True)]
        c = w
    layers.append(nn.Conv2d(c, 1, 3, stride=1, padding=1))
    critic = nn.Sequential(*layers)
    critic.is_critic = True  # torch_forward gives it the (L, ab) pair, torch_loss scores its logits
    return critic


def nanocolor_net(net: str = "reference", dtype=np.float32, seed: int = 0):
    """The nanocolor side of network `net` (one of NETS): a ColorNet, or the critic."""
    if net == "critic":
        return PatchCritic(dtype=dtype, seed=seed)
    if net == "unet":
        return ColorNet(DEFAULT_WIDTHS, arch="unet", dtype=dtype, seed=seed)
    return ColorNet(REFERENCE_WIDTHS, dtype=dtype, seed=seed, arch="seed")


def torch_net(net: str = "reference"):
    """The PyTorch side of network `net` (one of NETS)."""
    return {"unet": torch_unet, "critic": torch_critic}.get(net, torch_reference_net)()


def set_training(model, net, training: bool) -> None:
    """BatchNorm in training mode (batch statistics) or eval mode (running statistics), both sides
    (net None: nanocolor's alone; the critic has no BatchNorm: no modes)."""
    if isinstance(model, ColorNet):
        (model.train if training else model.eval)()
    if net is not None:
        net.train(training)


# What one training step of each side computes: a ColorNet's MSE of its prediction; the critic's
# binary cross-entropy of its logits for the pair (lightness, ab_true) against "real", its
# backward reaching the input as in the generator's step.

def nanocolor_forward(model, lightness, ab_true):
    """The network's output: a ColorNet's predicted ab from the lightness, the critic's logits for the pair."""
    if isinstance(model, PatchCritic):
        return engine.network(model).forward(lightness, ab_true)
    return engine.network(model).forward(lightness)  # what nanocolor's commands run for this --conv


def nanocolor_loss_and_backward(model, lightness, ab_true):
    """Forward, the loss, backward (every grads filled); returns (loss, d loss / d ab for the critic, else None)."""
    if isinstance(model, PatchCritic):
        loss_fn, critic = BCEWithLogitsLoss(), engine.network(model)
        loss = loss_fn.forward(critic.forward(lightness, ab_true), 1.0)
        return loss, critic.backward(loss_fn.backward())
    loss_fn, net = MSELoss(), engine.network(model)  # what nanocolor's commands run for this --conv
    loss = loss_fn.forward(net.forward(lightness), ab_true)
    net.backward(loss_fn.backward())
    return loss, None


def torch_forward(net, lightness, ab_true):
    """PyTorch's twin of nanocolor_forward, on NCHW tensors."""
    import torch
    return net(torch.cat([lightness, ab_true], dim=1)) if getattr(net, "is_critic", False) else net(lightness)


def torch_loss(net, lightness, ab_true):
    """PyTorch's twin of nanocolor_loss_and_backward's loss (call .backward() on it)."""
    import torch
    out = torch_forward(net, lightness, ab_true)
    if getattr(net, "is_critic", False):
        return torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    return torch.nn.functional.mse_loss(out, ab_true)


def nanocolor_convs(model: ColorNet) -> list:
    return [layer for layer in model.layers if isinstance(layer, Conv2d)]


def torch_convs(net) -> list:
    from torch import nn
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def param_pairs(model: ColorNet, net) -> list:
    """[(name, nanocolor layer, its parameter name, PyTorch module, its attribute)] for every
    parameter, in layer order: conv<i>.W / .b (weight (F, C, k, k), bias), bn<i>.gamma / .beta."""
    from torch import nn
    ours = [layer for layer in model.layers if isinstance(layer, (Conv2d, BatchNorm2d))]
    theirs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    if len(ours) != len(theirs):
        raise ValueError(f"nanocolor has {len(ours)} conv and BatchNorm layers, the PyTorch net {len(theirs)}")
    pairs, convs, norms = [], 0, 0
    for layer, module in zip(ours, theirs):
        if isinstance(layer, Conv2d) != isinstance(module, nn.Conv2d):
            raise ValueError(f"layer order differs: {type(layer).__name__} against {type(module).__name__}")
        if isinstance(layer, Conv2d):
            if ("b" in layer.params) != (module.bias is not None):
                raise ValueError(f"conv{convs}: one side has a bias, the other none")
            pairs.append((f"conv{convs}.W", layer, "W", module, "weight"))
            if "b" in layer.params:
                pairs.append((f"conv{convs}.b", layer, "b", module, "bias"))
            convs += 1
        else:
            pairs += [(f"bn{norms}.gamma", layer, "gamma", module, "weight"),
                      (f"bn{norms}.beta", layer, "beta", module, "bias")]
            norms += 1
    return pairs


def to_torch_layout(a: np.ndarray) -> np.ndarray:
    """A nanocolor parameter in PyTorch's layout: conv W (k, k, C, F) -> (F, C, k, k); vectors as they are."""
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1)) if a.ndim == 4 else a


def from_torch_layout(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0)) if a.ndim == 4 else a


def copy_weights(model: ColorNet, net) -> None:
    """Load nanocolor's parameters (and BatchNorm running statistics) into the PyTorch twin."""
    import torch
    with torch.no_grad():
        for name, layer, key, module, attr in param_pairs(model, net):
            value = to_torch_layout(backend.to_numpy(layer.params[key]))
            target = getattr(module, attr)
            if value.shape != tuple(target.shape):
                raise ValueError(f"{name}: shapes differ: {value.shape} vs {tuple(target.shape)}")
            target.copy_(torch.from_numpy(value))
            if isinstance(layer, BatchNorm2d) and key == "gamma":
                module.running_mean.copy_(torch.from_numpy(backend.to_numpy(layer.buffers["running_mean"])))
                module.running_var.copy_(torch.from_numpy(backend.to_numpy(layer.buffers["running_var"])))


def to_nchw(a: np.ndarray, device: str = "cpu"):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)


def rel_diff(ours, reference) -> float:
    """||ours - reference|| / ||reference|| in float64 (0 when both are zero)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def check_parity(model, net, lightness: np.ndarray, ab_true: np.ndarray, device: str = "cpu") -> dict:
    """One training step on both sides from equal weights; relative differences of everything.

    Returns {'loss': d, 'conv<i>.W': d, 'conv<i>.b': d, 'bn<i>.gamma': d, ..., 'adam_update': d,
    'eval_output': d}: the loss, every parameter gradient, the parameter change made by one Adam
    step, and (networks with BatchNorm) the output in eval mode after that step, which runs on
    the running statistics both sides updated in the training pass; for the critic also
    'input_grad', its gradient with respect to ab.
    """
    import torch
    dtype = torch.float64 if lightness.dtype == np.float64 else torch.float32
    net.to(dtype)  # before copying, so float64 weights are not rounded through float32
    copy_weights(model, net)
    torch_device = "cuda" if device == "gpu" else "cpu"
    net.to(torch_device)
    pairs = param_pairs(model, net)
    before = [backend.to_numpy(layer.params[key]).copy() for _, layer, key, _, _ in pairs]
    set_training(model, net, True)

    loss, d_ab = nanocolor_loss_and_backward(model, backend.xp.asarray(lightness), backend.xp.asarray(ab_true))

    net.zero_grad(set_to_none=True)
    torch_ab = to_nchw(ab_true, torch_device).requires_grad_(d_ab is not None)
    their_loss = torch_loss(net, to_nchw(lightness, torch_device), torch_ab)
    their_loss.backward()

    diffs = {"loss": rel_diff(float(loss), their_loss.item())}  # float(): a 0-d device array, read back
    if d_ab is not None:
        diffs["input_grad"] = rel_diff(backend.to_numpy(d_ab), torch_ab.grad.cpu().numpy().transpose(0, 2, 3, 1))
    torch_grads = [from_torch_layout(getattr(module, attr).grad.detach().cpu().numpy())
                   for _, _, _, module, attr in pairs]
    for (name, layer, key, _, _), grad in zip(pairs, torch_grads):
        diffs[name] = rel_diff(backend.to_numpy(layer.grads[key]), grad)

    # Both optimizers step from PyTorch's gradients, so the update compares Adam alone
    # (a near-zero gradient's float32 sign would otherwise decide a whole lr-sized move).
    for (_, layer, key, _, _), grad in zip(pairs, torch_grads):
        layer.grads[key] = backend.xp.asarray(grad)
    Adam(model.param_layers, lr=LR).step()
    torch.optim.Adam(net.parameters(), lr=LR).step()
    ours = np.concatenate([(backend.to_numpy(layer.params[key]) - p0).ravel()
                           for (_, layer, key, _, _), p0 in zip(pairs, before)])
    theirs = np.concatenate([(from_torch_layout(getattr(module, attr).detach().cpu().numpy()) - p0).ravel()
                             for (_, _, _, module, attr), p0 in zip(pairs, before)])
    diffs["adam_update"] = rel_diff(ours, theirs)

    if any(isinstance(layer, BatchNorm2d) for layer in model.layers):
        set_training(model, net, False)  # each side's own stepped weights and running statistics
        with torch.no_grad():
            theirs = net(to_nchw(lightness, torch_device)).cpu().numpy().transpose(0, 2, 3, 1)
        diffs["eval_output"] = rel_diff(backend.to_numpy(nanocolor_forward(model, backend.xp.asarray(lightness), None)),
                                        theirs)
    return diffs


# ---------------------------------------------------------------------------------------------
# Counting and measuring.

def conv_flops_per_image(model, height: int, width: int) -> int:
    """Forward multiply-add FLOPs of every conv for one image: 2*Ho*Wo*k*k*C_in*C_out each."""
    flops, h, w = 0, height, width
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            h, w = (conv_output_size(n, layer.k, layer.stride, layer.padding) for n in (h, w))
            flops += 2 * h * w * layer.k * layer.k * layer.c_in * layer.c_out
        elif isinstance(layer, MaxPool2d):
            h, w = h // 2, w // 2
        elif isinstance(layer, Upsample2d):
            h, w = h * 2, w * 2
    return flops


def reset_peak_rss() -> None:
    """Restart the peak-memory mark at the current RSS (Linux), so setup peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 2**10 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since reset_peak_rss(), or since the process started.

    VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS at fork time.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float | None:
    rss = _proc_status_mb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def time_steps(step, sync, warmup: int, steps: int) -> float:
    """Median seconds of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_nanocolor(height: int, width: int, batch: int, warmup: int, steps: int, device: str,
                  net: str = "reference") -> dict:
    backend.use_device(device)
    xp = backend.xp
    sync = xp.cuda.Device().synchronize if device == "gpu" else (lambda: None)
    model = nanocolor_net(net)
    optimizer = Adam(model.param_layers, lr=LR, map_tasks=engine.map_tasks())
    lightness, ab_true = (xp.asarray(a) for a in make_batch(height, width, batch))
    rss_before = current_rss_mb()
    reset_peak_rss()

    def train_step():
        nanocolor_loss_and_backward(model, lightness, ab_true)
        optimizer.step()

    set_training(model, None, True)
    result = {"train_s": time_steps(train_step, sync, warmup, steps), "peak_rss_mb": peak_rss_mb()}
    if device == "gpu":
        result["gpu_pool_mb"] = xp.get_default_memory_pool().total_bytes() / 2**20
    set_training(model, None, False)
    result["infer_s"] = time_steps(lambda: nanocolor_forward(model, lightness, ab_true), sync, warmup, steps)
    result["rss_before_mb"] = rss_before
    return result


def run_torch(height: int, width: int, batch: int, warmup: int, steps: int, device: str,
              threads: int, channels_last: bool, net_name: str = "reference") -> dict:
    import torch
    torch.set_num_threads(threads)
    torch_device = "cuda" if device == "gpu" else "cpu"
    if device == "gpu":
        torch.backends.cudnn.allow_tf32 = False  # a float32 race: no TF32 tensor-core shortcuts
        torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    model = nanocolor_net(net_name)  # only for its initial weights
    net = torch_net(net_name)
    copy_weights(model, net)
    del model
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(torch_device, memory_format=memory_format)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    lightness, ab_true = (to_nchw(a, torch_device).contiguous(memory_format=memory_format)
                          for a in make_batch(height, width, batch))
    rss_before = current_rss_mb()
    reset_peak_rss()
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()

    ab_input = ab_true.clone().requires_grad_(getattr(net, "is_critic", False))  # the critic's d/d ab, as ours

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        ab_input.grad = None
        torch_loss(net, lightness, ab_input).backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode():
            torch_forward(net, lightness, ab_true)

    net.train()
    result = {"train_s": time_steps(train_step, sync, warmup, steps), "peak_rss_mb": peak_rss_mb()}
    if device == "gpu":
        result["gpu_pool_mb"] = torch.cuda.max_memory_reserved() / 2**20
    net.eval()
    result["infer_s"] = time_steps(infer_step, sync, warmup, steps)
    result["rss_before_mb"] = rss_before
    return result


def run_gemm(device: str, n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of one n x n float32 matrix multiply through NumPy (CPU) or CuPy (GPU)."""
    backend.use_device(device)
    xp = backend.xp
    sync = xp.cuda.Device().synchronize if device == "gpu" else (lambda: None)
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    out = xp.empty((n, n), dtype=xp.float32)
    seconds = time_steps(lambda: xp.matmul(a, b, out=out), sync, warmup=2, steps=repeats)
    return {"gemm_gflops": 2 * n**3 / seconds / 1e9, "gemm_n": n}


# ---------------------------------------------------------------------------------------------
# Orchestration: parity in this process, each measurement in a fresh subprocess.

def run_worker(args) -> dict:
    if args.worker == "gemm":
        return run_gemm(args.device)
    height, width, batch = parse_config(args.configs[0])
    net = args.nets[0]
    if args.worker == "nanocolor":
        return run_nanocolor(height, width, batch, args.warmup, args.steps, args.device, net)
    return run_torch(height, width, batch, args.warmup, args.steps, args.device, args.threads,
                     args.torch_channels_last, net)


def spawn(worker: str, config: str, args, net: str = "reference") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--configs", config,
               "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--conv", args.conv, "--nets", net]
    if args.torch_channels_last:
        command.append("--torch-channels-last")
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{worker} worker failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parity_or_abort(height: int, width: int, batch: int, device: str, threads: int,
                    net_name: str = "reference") -> tuple[float, float, float | None]:
    """(worst relative difference of loss and gradients, that of the Adam update, that of the
    eval-mode output or None without BatchNorm); exits when any is above tolerance."""
    import torch
    torch.set_num_threads(threads)
    if device == "gpu":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    backend.use_device(device)
    dtype = np.float64 if net_name == "unet" else np.float32
    tolerance = PARITY_TOL_FLOAT64 if dtype == np.float64 else PARITY_TOL_FLOAT32
    model = nanocolor_net(net_name, dtype=dtype)
    expected = REFERENCE_PARAMS if net_name == "reference" else model.num_params()
    if model.num_params() != expected:
        sys.exit(f"nanocolor's {net_name} net has {model.num_params():,} parameters, not {expected:,}")
    net = torch_net(net_name)
    n_torch = sum(p.numel() for p in net.parameters())
    if n_torch != expected:
        sys.exit(f"the PyTorch {net_name} net has {n_torch:,} parameters, not {expected:,}")
    diffs = check_parity(model, net, *make_batch(height, width, batch, dtype=dtype), device=device)
    if not max(diffs.values()) < tolerance:
        lines = "\n".join(f"  {name:12s} {d:.3e}" for name, d in diffs.items())
        sys.exit(f"parity check FAILED for the {net_name} net at {height}x{width} batch {batch}: "
                 f"nanocolor and PyTorch differ "
                 f"(relative difference, tolerance {tolerance:g} in {np.dtype(dtype).name}):\n{lines}")
    worst_name = max((name for name in diffs if name not in ("adam_update", "eval_output")), key=diffs.get)
    return diffs[worst_name], diffs["adam_update"], diffs.get("eval_output")


def blas_kernel() -> dict:
    """Which BLAS NumPy runs: {'library', 'config', 'corename'} (threadpoolctl's view when it is
    installed, else the OpenBLAS in NumPy's wheel asked directly, else NumPy's build config)."""
    try:
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return {"library": info.get("internal_api"), "config": info.get("version"),
                        "corename": info.get("architecture")}
    except ImportError:
        pass
    import ctypes
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            core, config = (getattr(lib, f"{prefix}_get_{what}{suffix}", None) for what in ("corename", "config"))
            if core is not None and config is not None:
                core.restype = config.restype = ctypes.c_char_p
                return {"library": "openblas", "config": config().decode(), "corename": core().decode()}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {"library": blas.get("name"), "config": blas.get("openblas configuration") or blas.get("version"),
                "corename": None}
    except Exception:  # an older NumPy without mode="dicts"
        return {"library": None, "config": None, "corename": None}


def native_blas_kernel() -> str | None:
    """The kernel OpenBLAS picks for this CPU on its own: blas_kernel() in a child process
    without the variables that override its choice."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_KERNEL_ENV_VARS}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import json, bench; print(json.dumps(bench.blas_kernel()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["corename"]
    except (IndexError, ValueError, KeyError):
        return None


def blas_line() -> tuple[str, str | None]:
    """(one line naming the BLAS kernel, a warning when an environment variable overrides it, or None)."""
    kernel = blas_kernel()
    line = f"BLAS: {kernel['library']} kernel {kernel['corename'] or '?'} ({kernel['config']})"
    forced = {var: os.environ[var] for var in BLAS_KERNEL_ENV_VARS if var in os.environ}
    if not forced:
        return line, None
    native = native_blas_kernel()
    settings = " ".join(f"{var}={value}" for var, value in forced.items())
    if native and native != kernel["corename"]:
        what = f"forces the {kernel['corename']} kernel instead of {native}, the one this CPU would run"
    else:
        what = f"may change the kernel (now {kernel['corename']}; without it: {native or '?'})"
    warning = (f"WARNING: {settings} in the environment {what}; for a fair race run "
               f"`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench.py ...`")
    return line, warning


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    if device == "gpu":
        import torch
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def _median(values) -> float | None:
    """The median of numbers; None when a measurement was unavailable (RSS off Linux without psutil)."""
    values = list(values)
    return None if None in values else statistics.median(values)


def benchmark_config(config: str, args, gemm: dict, net: str = "reference") -> dict:
    height, width, batch = parse_config(config)
    worst, adam_diff, eval_diff = parity_or_abort(height, width, batch, args.device, args.threads, net)
    # Rounds alternate which side runs first, and each round's ratio compares two runs minutes
    # apart at most: a machine whose speed drifts (a shared host) moves both sides of a ratio.
    rounds = []
    for r in range(args.rounds):
        sides = ("nanocolor", "torch") if r % 2 == 0 else ("torch", "nanocolor")
        runs = {side: spawn(side, config, args, net) for side in sides}
        rounds.append((runs["nanocolor"], runs["torch"]))
    train_ratios = [theirs["train_s"] / ours["train_s"] for ours, theirs in rounds]
    infer_ratios = [theirs["infer_s"] / ours["infer_s"] for ours, theirs in rounds]
    ours, theirs = ({key: _median(run[side][key] for run in rounds) for key in rounds[0][side]} for side in (0, 1))
    model = nanocolor_net(net)
    flops = conv_flops_per_image(model, height, width)
    train_gflops = 3 * flops * batch / ours["train_s"] / 1e9
    row = {
        "net": net,
        "params": model.num_params(),
        "config": f"{height}x{width} batch {batch}",
        "device": args.device,
        "threads": args.threads,
        "nanocolor_train_img_s": batch / ours["train_s"],
        "torch_train_img_s": batch / theirs["train_s"],
        "train_ratio": statistics.median(train_ratios),
        "train_ratio_range": [min(train_ratios), max(train_ratios)],
        "nanocolor_infer_img_s": batch / ours["infer_s"],
        "torch_infer_img_s": batch / theirs["infer_s"],
        "infer_ratio": statistics.median(infer_ratios),
        "infer_ratio_range": [min(infer_ratios), max(infer_ratios)],
        "rounds": args.rounds,
        "gemm_gflops": gemm["gemm_gflops"],
        "nanocolor_train_gflops": train_gflops,
        "train_gflops_fraction_of_gemm": train_gflops / gemm["gemm_gflops"],
        "nanocolor_peak_rss_mb": ours["peak_rss_mb"],
        "torch_peak_rss_mb": theirs["peak_rss_mb"],
        "nanocolor_rss_before_train_mb": ours["rss_before_mb"],
        "torch_rss_before_train_mb": theirs["rss_before_mb"],
        "peak_rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        "parity_max_rel_diff": worst,
        "parity_adam_update_rel_diff": adam_diff,
        "parity_eval_output_rel_diff": eval_diff,
        "forward_gflop_per_image": flops / 1e9,
        "conv_engine": args.conv,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch_memory_format": "channels_last" if args.torch_channels_last else "contiguous (NCHW)",
    }
    if args.device == "gpu":
        row["nanocolor_gpu_pool_mb"], row["torch_gpu_pool_mb"] = ours["gpu_pool_mb"], theirs["gpu_pool_mb"]
    return row


def print_table(rows: list, header: str) -> None:
    print(header)
    for row in rows:
        eval_note = "" if row.get("parity_eval_output_rel_diff") is None else \
            f", eval-mode output {row['parity_eval_output_rel_diff']:.1e}"
        print(f"\n{row.get('net', 'reference')} net ({row.get('params', REFERENCE_PARAMS):,} parameters), "
              f"{row['config']}  ({row['rounds']} rounds, each the median of {row['steps']} steps after "
              f"{row['warmup']} warm-up; "
              f"parity: loss/gradients max rel. diff {row['parity_max_rel_diff']:.1e}, "
              f"Adam update {row['parity_adam_update_rel_diff']:.1e}{eval_note})")
        print(f"  {'':28s}{'nanocolor':>12s}{'PyTorch':>12s}{'ratio':>8s}")
        print(f"  {'training step, images/s':28s}{row['nanocolor_train_img_s']:12.2f}"
              f"{row['torch_train_img_s']:12.2f}{row['train_ratio']:8.2f}")
        print(f"  {'inference, images/s':28s}{row['nanocolor_infer_img_s']:12.2f}"
              f"{row['torch_infer_img_s']:12.2f}{row['infer_ratio']:8.2f}")
        if row["rounds"] > 1:
            (t0, t1), (i0, i1) = row["train_ratio_range"], row["infer_ratio_range"]
            print(f"  {'ratio range over rounds':28s}{'':24s} training {t0:.2f}-{t1:.2f}, inference {i0:.2f}-{i1:.2f}")
        print(f"  {'peak RSS in training, MiB':28s}{row['nanocolor_peak_rss_mb']:12.0f}"
              f"{row['torch_peak_rss_mb']:12.0f}{row['peak_rss_ratio']:8.2f}")
        if row["nanocolor_rss_before_train_mb"] is not None:
            print(f"  {'  of which added by steps':28s}"
                  f"{row['nanocolor_peak_rss_mb'] - row['nanocolor_rss_before_train_mb']:12.0f}"
                  f"{row['torch_peak_rss_mb'] - row['torch_rss_before_train_mb']:12.0f}")
        print(f"  nanocolor training: {row['nanocolor_train_gflops']:.1f} GFLOP/s = "
              f"{100 * row['train_gflops_fraction_of_gemm']:.0f}% of the {row['gemm_gflops']:.1f} GFLOP/s "
              f"float32 GEMM ceiling ({row['forward_gflop_per_image']:.3f} GFLOP forward per image)")
        if "nanocolor_gpu_pool_mb" in row:
            print(f"  GPU memory pool, MiB: nanocolor {row['nanocolor_gpu_pool_mb']:.0f}, "
                  f"PyTorch {row['torch_gpu_pool_mb']:.0f}")
    print("\nratio = nanocolor / PyTorch throughput (above 1: nanocolor faster), the median of the "
          "rounds' ratios; throughputs and memory are medians over rounds; for memory, nanocolor / PyTorch peak.")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="HEIGHTxWIDTHxBATCH, e.g. 128x128x16 64x64x32 (the default)")
    parser.add_argument("--threads", type=int, default=2, help="threads for BLAS and PyTorch (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each side, alternating which runs first; throughputs and "
                             "ratios are the medians over rounds (default 3)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: nanocolor on CuPy against PyTorch CUDA")
    parser.add_argument("--torch-channels-last", action="store_true",
                        help="run PyTorch in channels_last memory format (default: its NCHW default)")
    parser.add_argument("--conv", choices=engine.CONVS, default="auto",
                        help="nanocolor's conv algorithm (nanocolor/engine.py): auto (default), the textbook "
                             "im2col, gemm, winograd or winograd4")
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS),
                        help="networks to race: reference (the 3.1M-parameter autoencoder) and unet "
                             "(ColorNet(DEFAULT_WIDTHS, arch='unet'), BatchNorm); default both")
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    parser.add_argument("--worker", choices=("nanocolor", "torch", "gemm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for config in args.configs:
        parse_config(config)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
        parser.error("--steps, --rounds and --threads must be at least 1, --warmup at least 0")
    engine.set_conv(args.conv)  # for the parity check here and in each nanocolor worker

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    try:
        import torch
    except ImportError:
        sys.exit("the benchmark needs PyTorch: pip install 'nanocolor[bench]' (torch==2.13.0, CPU build)")
    if args.device == "gpu":
        if not torch.cuda.is_available():
            sys.exit("--device gpu: PyTorch sees no CUDA GPU")
        try:
            backend.use_device("gpu")
        except backend.DeviceError as err:
            sys.exit(str(err))

    load = os.getloadavg()
    kernel, warning = blas_line()
    if warning:
        print(warning, file=sys.stderr)
    gemm = spawn("gemm", args.configs[0], args)
    rows = [benchmark_config(config, args, gemm, net) for net in args.nets for config in args.configs]
    if args.json:
        for row in rows:
            print(json.dumps({**row, "blas": blas_kernel(), "blas_warning": warning}))
    else:
        print_table(rows, f"nanocolor vs PyTorch {torch.__version__}, device {args.device}, "
                          f"{args.threads} threads, float32, nanocolor engine {args.conv}\n"
                          f"machine: {machine_description(args.device)}; "
                          f"NumPy {np.__version__}; load average at start {load[0]:.2f}\n{kernel}"
                          + (f"\n{warning}" if warning else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
