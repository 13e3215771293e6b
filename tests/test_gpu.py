"""The `--device gpu` code paths against the CPU, on two kinds of device:
  stand-in  NumPy under CuPy's rules (tests/fake_gpu.py), on every machine: a training run, its
            resume, and colorizing must never hand a device array to NumPy or mix it with a host
            array;
  cupy      a real NVIDIA GPU through CuPy, where one is present (skipped otherwise; run
            bench/gpu_check.sh on a GPU machine).
Every textbook layer's forward and backward, the fast engine's conv algorithms, resampling and
BatchNorm, whole networks under every engine, a short training run with its resume across
devices, and colorizing a photo must give the CPU's numbers."""
from __future__ import annotations

import numpy as np
import pytest

import fake_gpu
from conftest import colorful_rgb, save_image
from nanocolor import backend, engine, fast
from nanocolor.fast import norm, resample
from nanocolor.infer import colorize_array
from nanocolor.layers import BatchNorm2d, Concat, Conv2d, LeakyReLU, MaxPool2d, ReLU, Tanh, Upsample2d
from nanocolor.model import ColorNet
from nanocolor.optim import Adam
from nanocolor.serialize import load_npz
from nanocolor.trainer import TrainConfig, Trainer


def _real_gpu() -> str | None:
    """Why a real GPU cannot be used here, or None when it can."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as err:  # ImportError, or a CUDA runtime error without a driver
        return f"no CuPy GPU ({err.__class__.__name__})"
    return None


@pytest.fixture(params=["stand-in", "cupy"])
def device(request, monkeypatch):
    """backend.xp is the device's module for this test (the CPU fixture restores NumPy after)."""
    if request.param == "stand-in":
        fake_gpu.install(monkeypatch)
    elif _real_gpu():
        pytest.skip(_real_gpu())
    module = backend.use_device("gpu")
    yield module
    backend.use_device("cpu")


def test_the_device_is_strict_about_host_arrays(device):
    a = device.asarray(np.arange(6.0).reshape(2, 3))
    host = np.ones((2, 3))
    with pytest.raises(TypeError):
        np.asarray(a)  # implicit device -> host
    with pytest.raises(TypeError):
        a + host  # mixing in arithmetic
    with pytest.raises(TypeError):
        np.concatenate([a, host])  # mixing in a NumPy function
    with pytest.raises((TypeError, ValueError)):  # CuPy 14 says ValueError here, the stand-in TypeError
        a[...] = host  # what Adam's restore did: CuPy refuses a host array as the value
    b = np.concatenate([a, a * 2])  # device-only NumPy calls are dispatched to the device
    assert isinstance(b, device.ndarray) and b.shape == (4, 3)
    np.testing.assert_array_equal(b.get()[2:], np.arange(6.0).reshape(2, 3) * 2)


def test_adam_restores_host_state_onto_device_parameters(device):
    """A checkpoint's Adam state is host data; restoring it onto device parameters must copy it over."""
    layer = type("Layer", (), {})()
    layer.params = {"W": device.asarray(np.ones((2, 3), dtype=np.float32))}
    layer.grads = {"W": device.asarray(np.full((2, 3), 0.5, dtype=np.float32))}
    opt = Adam([layer])
    opt.step()
    state = {k: backend.to_numpy(v) if hasattr(v, "shape") else v for k, v in opt.state_dict().items()}
    again = Adam([layer])
    again.load_state_dict(state)
    assert again.t == 1 and isinstance(again.m[0], device.ndarray)
    np.testing.assert_array_equal(again.m[0].get(), opt.m[0].get())


def _photos(folder, count: int = 8):
    for i in range(count):
        save_image(folder / f"{i}.png", colorful_rgb(20, 20, seed=i))
    return folder


@pytest.mark.parametrize("conv", ["im2col", "auto"], ids=["textbook", "fast"])
@pytest.mark.parametrize("arch", ["seed", "unet", "unet+gan"])
def test_training_and_resume_across_devices_equal_the_cpu(tmp_path, device, arch, conv):
    """2 epochs on the CPU; vs 1 on the device, resumed for 1 on the CPU; vs 1 on the CPU resumed on
    the device; with the textbook computing the network, and with the fast engine. unet+gan:
    adversarial fine-tuning, the critic and its Adam state travel too."""
    photos = _photos(tmp_path / "photos")
    gan = {}
    if arch == "unet+gan":
        arch = "unet"
        ColorNet((4, 8), arch=arch, seed=1).save(tmp_path / "init.npz")
        gan = {"init": str(tmp_path / "init.npz"), "gan": True, "critic_widths": (4, 8), "critic_warmup": 1}

    def config(out, epochs):
        return TrainConfig(data=str(photos), out=str(tmp_path / out), epochs=epochs, batch_size=2, lr=3e-3,
                           size=8, crop_margin=2, val_fraction=0.25, seed=1, widths=(4, 8), arch=arch,
                           progress=False, **gan)

    def on(where: str) -> None:
        backend.use_device(where)

    with engine.use_conv(conv):
        on("cpu")
        trainer = Trainer(config("cpu", 2))
        assert (trainer.net is trainer.model) == (conv == "im2col")
        trainer.run()
        on("gpu")
        Trainer(config("gpu_cpu", 1)).run()
        on("cpu")
        Trainer(config("gpu_cpu", 2), resume=True).run()  # a device run's checkpoint resumed on the CPU
        Trainer(config("cpu_gpu", 1)).run()
        on("gpu")
        Trainer(config("cpu_gpu", 2), resume=True).run()  # host checkpoint -> device model and Adam state
    cpu = load_npz(tmp_path / "cpu" / "checkpoint.npz")[0]
    for run in ("gpu_cpu", "cpu_gpu"):
        other = load_npz(tmp_path / run / "checkpoint.npz")[0]
        assert other.keys() == cpu.keys()
        for name in cpu:
            np.testing.assert_allclose(other[name], cpu[name], rtol=1e-3, atol=1e-4, err_msg=f"{run} {name}")


@pytest.mark.parametrize("conv", ["im2col", "auto"], ids=["textbook", "fast"])
@pytest.mark.parametrize("arch", ["seed", "unet"])
def test_colorize_on_the_device_equals_the_cpu(device, arch, conv):
    """Within one level of 8 bits."""
    rgb = colorful_rgb(37, 53, seed=3).astype(np.float32) / 255
    backend.use_device("cpu")
    model = ColorNet((4, 8), seed=2, arch=arch)
    with engine.use_conv(conv):
        on_cpu = colorize_array(model, rgb, work_size=32)
        backend.use_device("gpu")
        model.to_device()
        on_device = colorize_array(model, rgb, work_size=32)
    assert isinstance(on_device, np.ndarray) and on_device.shape == (37, 53, 3)
    assert np.abs(on_device * 255 - on_cpu * 255).max() < 1


LAYERS = {
    "conv3x3": lambda dtype: Conv2d(5, 6, 3, rng=np.random.default_rng(0), dtype=dtype),
    "conv1x1": lambda dtype: Conv2d(5, 3, 1, rng=np.random.default_rng(0), dtype=dtype),
    "conv_no_bias": lambda dtype: Conv2d(5, 4, 3, rng=np.random.default_rng(0), dtype=dtype, bias=False),
    "maxpool": lambda dtype: MaxPool2d(),
    "upsample": lambda dtype: Upsample2d(),
    "relu": lambda dtype: ReLU(),
    "tanh": lambda dtype: Tanh(),
    "batchnorm": lambda dtype: BatchNorm2d(5, dtype=dtype),
    "conv4x4_stride2": lambda dtype: Conv2d(5, 6, 4, rng=np.random.default_rng(0), dtype=dtype, stride=2, padding=1),
    "leaky_relu": lambda dtype: LeakyReLU(),
}


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_forward_and_backward_equal_numpy(device, name, dtype, rtol):
    """The textbook layers (nanocolor/layers.py) on the device."""
    _compare_layer(name, dtype, rtol)


def _compare_layer(name: str, dtype, rtol: float) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 10, 5)).astype(dtype)
    results = {}
    for where in ("cpu", "gpu"):
        backend.use_device(where)
        layer = LAYERS[name](dtype)
        for store in (layer.params, getattr(layer, "buffers", {})):
            for key, value in store.items():
                store[key] = backend.xp.asarray(value)
        out = layer.forward(backend.xp.asarray(x))
        dout = backend.xp.asarray(np.random.default_rng(6).standard_normal(out.shape).astype(dtype))
        dx = layer.backward(dout)
        results[where] = [backend.to_numpy(out), backend.to_numpy(dx)] + \
            [backend.to_numpy(layer.grads[key]) for key in sorted(layer.params)]
    for cpu, gpu in zip(results["cpu"], results["gpu"]):
        assert gpu.dtype == cpu.dtype
        np.testing.assert_allclose(gpu, cpu, rtol=rtol, atol=rtol * np.abs(cpu).max())


def _device_randn(shape: tuple, dtype, seed: int):
    return backend.xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _fast_conv(conv: str, k: int):
    """The fast engine's conv `conv` (k x k, 5 -> 6 channels): forward, then backward."""
    def run(x, dtype) -> list:
        layer = Conv2d(5, 6, k, rng=np.random.default_rng(0), dtype=dtype)
        w = backend.xp.asarray(layer.params["W"])
        b = backend.xp.asarray(np.random.default_rng(1).standard_normal(6).astype(dtype))
        out, cache = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w, conv))
        dx, dw, db = fast.conv2d_backward(_device_randn(out.shape, dtype, 6), w, cache)
        _, cache = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w, conv))
        no_dx, dw_alone, _ = fast.conv2d_backward(_device_randn(out.shape, dtype, 6), w, cache, input_grad=False)
        assert no_dx is None
        relu_out, _ = fast.conv2d_forward(x, w, b, fast.conv2d_path(x, w, conv), relu=True, inference=True)
        return [out, dx, dw, db, dw_alone, relu_out]
    return run


def _fast_maxpool(x, dtype) -> list:
    out, cache = resample.maxpool2d_forward(x)
    dout = _device_randn(out.shape, dtype, 6)
    relu_out, relu_cache = resample.maxpool2d_forward(backend.xp.maximum(x, 0))
    return [out, resample.maxpool2d_backward(dout, cache), relu_out,
            resample.maxpool2d_backward(dout, relu_cache, relu=True),
            resample.maxpool2d_backward(dout, cache, plus=_device_randn(x.shape, dtype, 7))]


def _fast_upsample(x, dtype) -> list:
    out = resample.upsample2d_forward(x)
    skip = _device_randn(out.shape[:3] + (3,), dtype, 7)
    return [out, resample.upsample2d_backward(_device_randn(out.shape, dtype, 6)),
            norm.upsample_concat_forward(x, skip)]


def _fast_relu_backward(x, dtype) -> list:
    return [resample.relu_backward(_device_randn(x.shape, dtype, 6), backend.xp.maximum(x, 0))]


def _fast_batchnorm(relu: bool):
    """fast.norm's BatchNorm in training (its ReLU in the same pass or not), its backward, the
    running statistics it leaves; then in inference, and folded into a conv."""
    def run(x, dtype) -> list:
        bn = BatchNorm2d(5, dtype=dtype)
        bn.params["gamma"] = backend.xp.asarray(np.linspace(0.5, 1.5, 5).astype(dtype))
        bn.params["beta"] = backend.xp.asarray(np.linspace(-0.2, 0.3, 5).astype(dtype))
        for key, value in bn.buffers.items():
            bn.buffers[key] = backend.xp.asarray(value)
        out, cache = norm.batchnorm2d_forward(bn, x, relu=relu)
        dx = norm.batchnorm2d_backward(bn, _device_randn(out.shape, dtype, 6), cache)
        results = [out, dx, bn.grads["gamma"], bn.grads["beta"], bn.buffers["running_mean"], bn.buffers["running_var"]]
        bn.training = False
        eval_out, eval_cache = norm.batchnorm2d_forward(bn, x, relu=relu)
        assert eval_cache is None
        conv = Conv2d(5, 5, 3, rng=np.random.default_rng(0), dtype=dtype, bias=False)
        conv.params["W"] = backend.xp.asarray(conv.params["W"])
        return results + [eval_out, *norm.folded_weights(conv, bn)]
    return run


FAST = {**{f"conv3x3_{conv}": _fast_conv(conv, 3) for conv in fast.CONVS},
        "conv1x1": _fast_conv("auto", 1),
        "maxpool": _fast_maxpool,
        "upsample": _fast_upsample,
        "relu_backward": _fast_relu_backward,
        "batchnorm": _fast_batchnorm(relu=False),
        "batchnorm_relu": _fast_batchnorm(relu=True)}


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("name", FAST)
def test_the_fast_engines_pieces_equal_numpy(device, name, dtype, rtol):
    """The fast engine's conv algorithms, resampling and BatchNorm on the device, against the same
    calls on the CPU (which tests/test_fast.py compares with the textbook)."""
    x = np.random.default_rng(5).standard_normal((2, 8, 12, 5)).astype(dtype)  # sizes for both Winograds
    results = {}
    for where in ("cpu", "gpu"):
        backend.use_device(where)
        arrays = FAST[name](backend.xp.asarray(x), dtype)
        assert all(isinstance(a, np.ndarray if where == "cpu" else device.ndarray) for a in arrays)
        results[where] = [backend.to_numpy(a) for a in arrays]
    for cpu, gpu in zip(results["cpu"], results["gpu"], strict=True):
        assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
        np.testing.assert_allclose(gpu, cpu, rtol=rtol, atol=rtol * np.abs(cpu).max())


@pytest.mark.parametrize("conv", engine.CONVS)
@pytest.mark.parametrize("arch", ["seed", "unet"])
def test_a_network_step_and_inference_on_the_device_equal_the_cpu(device, arch, conv):
    """engine.network(model) on the device, a training step (Adam included) then inference:
    the loss, every gradient, the updated weights and BatchNorm's statistics, and the output
    equal the CPU's."""
    from nanocolor.loss import MSELoss
    from nanocolor.trainer import train_step
    rng = np.random.default_rng(0)
    lightness = rng.uniform(-1, 1, (2, 16, 8, 1))
    ab = rng.uniform(-0.3, 0.3, (2, 16, 8, 2))
    results = {}
    for where in ("cpu", "gpu"):
        backend.use_device(where)
        model = ColorNet((4, 16, 16), seed=1, arch=arch, dtype=np.float64)  # on the device
        with engine.use_conv(conv):
            net = engine.network(model)
            optimizer = Adam(model.param_layers, lr=1e-2, map_tasks=engine.map_tasks())
        loss = train_step(net, MSELoss(), optimizer, backend.xp.asarray(lightness), backend.xp.asarray(ab))
        arrays = [layer.grads[name] for layer in model.param_layers for name in layer.params]
        stores = [store for layer in model.param_layers for store in (layer.params, getattr(layer, "buffers", {}))]
        arrays += [store[name] for store in stores for name in store]
        arrays.append(net.eval().forward(backend.xp.asarray(lightness)))
        assert where == "cpu" or all(isinstance(a, device.ndarray) for a in arrays)
        results[where] = (float(loss), [backend.to_numpy(a) for a in arrays])
    assert results["gpu"][0] == pytest.approx(results["cpu"][0], rel=1e-10)
    for cpu, gpu in zip(results["cpu"][1], results["gpu"][1], strict=True):
        assert gpu.dtype == cpu.dtype
        np.testing.assert_allclose(gpu, cpu, rtol=1e-7, atol=1e-9 * np.abs(cpu).max())


def test_concat_equal_numpy(device):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 4, 6, 3)), rng.standard_normal((2, 4, 6, 2))
    cat = Concat()
    out = cat.forward(device.asarray(a), device.asarray(b))
    np.testing.assert_array_equal(backend.to_numpy(out), np.concatenate([a, b], axis=-1))
    da, db = cat.backward(out)
    np.testing.assert_array_equal(backend.to_numpy(da), a)
    np.testing.assert_array_equal(backend.to_numpy(db), b)


@pytest.mark.parametrize("conv", engine.CONVS)
def test_a_device_step_never_starts_the_cpu_worker_pool(device, monkeypatch, conv):
    """Partial sums have one slot on a GPU; asking for the CPU workers there would start the pool,
    set OpenBLAS threads and change malloc settings for nothing."""
    from nanocolor.fast import parallel
    from nanocolor.loss import MSELoss
    from nanocolor.trainer import train_step

    def no_workers():
        raise AssertionError("the CPU worker pool was asked for on the device")
    monkeypatch.setattr(parallel, "workers", no_workers)
    model = ColorNet((4, 16), seed=1, arch="unet")  # 16 channels: the Winograd and multiply-then-shift sizes
    rng = np.random.default_rng(0)
    lightness = device.asarray(rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32))
    ab = device.asarray(rng.uniform(-0.3, 0.3, (2, 8, 8, 2)).astype(np.float32))
    with engine.use_conv(conv):
        net = engine.network(model)
        optimizer = Adam(model.param_layers, map_tasks=engine.map_tasks())
    loss = train_step(net, MSELoss(), optimizer, lightness, ab)
    assert np.isfinite(float(loss))
    assert np.isfinite(float(net.eval().forward(lightness).sum()))  # inference too (BatchNorm folded)
