"""The fast engine (nanocolor/fast) against the textbook layers: the 'gemm' convolution equal to
the im2col reference, the CPU worker pool (same numbers with one worker or several), max-pool,
upsample and ReLU against loop references on both codes, and the in-place Adam against the
textbook update. Gradient checks of every engine: tests/test_layers.py."""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import adam_reference, make_conv
from nanocolor import fast
from nanocolor.fast import parallel
from nanocolor.layers import MaxPool2d, ReLU, Upsample2d
from nanocolor.model import ColorNet
from nanocolor.optim import Adam

MATCH_CASES = [
    ((2, 5, 7, 3), 4, 3),    # odd sizes
    ((1, 4, 6, 1), 2, 3),    # batch 1: the workers split image rows
    ((3, 3, 5, 2), 3, 1),    # 1x1 kernel: the patch matrix is x itself
    ((1, 7, 5, 2), 3, 5),    # 5x5 kernel
    ((2, 5, 4, 8), 2, 3),    # 4F <= C: multiply first, then add shifted slices
    ((2, 5, 6, 32), 8, 3),   # ... with F >= 8: the products channels-last
    ((1, 2, 3, 9), 2, 5),    # ... with a kernel larger than the image
    ((5, 6, 4, 3), 5, 3),    # more images than pieces
    ((1, 9, 4, 2), 3, 3),    # one image in bands of rows
]


def textbook_and_fast(engine: str, conv_args: tuple, x, dout, input_grad: bool = True, dtype=np.float64) -> tuple:
    """(out, dx, grads) of the textbook code and of `engine`, from equal weights and the same data."""
    results = []
    for name in ("im2col", engine):
        conv = make_conv(*conv_args, dtype=dtype)
        conv.input_grad = input_grad
        with fast.use_engine(name):
            out = conv.forward(x.astype(dtype))
            dx = conv.backward(dout.astype(dtype))
        assert conv.cache[0] == name or (name == "winograd" and conv.cache[0] == "gemm")
        results.append((out, dx, conv.grads, conv.cache[0]))
    return tuple(results)


# ---------------------------------------------------------------------------------------------
# The "gemm" convolution (gradients by central differences: tests/test_layers.py)

@pytest.mark.parametrize("shape,c_out,k", MATCH_CASES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_gemm_conv_matches_textbook(shape, c_out, k, input_grad, workers, rng):
    x, dout = rng.standard_normal(shape), rng.standard_normal(shape[:3] + (c_out,))
    (out, dx, grads, _), (out_fast, dx_fast, grads_fast, path) = textbook_and_fast(
        "gemm", (shape[-1], c_out, k), x, dout, input_grad)
    assert path == "gemm"
    np.testing.assert_allclose(out_fast, out, rtol=1e-12, atol=1e-12)
    if input_grad:
        np.testing.assert_allclose(dx_fast, dx, rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(grads_fast[name], grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("low_shape,skip_channels,c_out,k", [
    ((2, 3, 4, 6), 4, 2, 3),    # upsampled + skip, few outputs: channels-first products
    ((1, 2, 5, 20), 12, 8, 3),  # ... F >= 8: channels-last products
    ((9, 4, 2, 8), 3, 2, 3),    # batch in pieces
    ((1, 3, 3, 8), 2, 2, 5),    # 5x5 kernel
])
def test_multiply_then_shift_takes_upsampled_products_at_low_resolution(low_shape, skip_channels, c_out, k,
                                                                        workers, rng):
    """conv(concat(upsample2x(low), skip)) with low's products taken at low's size and upsampled."""
    from nanocolor.fast import gemm
    low = rng.standard_normal(low_shape)
    N, h, w, C_low = low_shape
    skip = rng.standard_normal((N, 2 * h, 2 * w, skip_channels))
    conv = make_conv(C_low + skip_channels, c_out, k)
    joined = np.concatenate([Upsample2d().forward(low), skip], axis=-1)  # Concat's order: upsampled first
    with fast.use_engine("im2col"):
        expected = conv.forward(joined)
    got = gemm.multiply_then_shift(skip, conv.params["W"], conv.params["b"], upsampled=low)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_gemm_conv_float32(rng):
    """float32 in, float32 out, close to the float64 textbook numbers."""
    x, dout = rng.standard_normal((2, 6, 5, 8)), rng.standard_normal((2, 6, 5, 3))
    (out, dx, grads, _), _ = textbook_and_fast("gemm", (8, 3, 3), x, dout)
    conv = make_conv(8, 3, 3, dtype=np.float32)
    with fast.use_engine("gemm"):
        out32, dx32 = conv.forward(x.astype(np.float32)), conv.backward(dout.astype(np.float32))
    assert out32.dtype == dx32.dtype == conv.grads["W"].dtype == conv.grads["b"].dtype == np.float32
    np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx32, dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(conv.grads["W"], grads["W"], rtol=1e-4, atol=1e-4)


def test_padding_buffers_do_not_leak_between_paddings(rng):
    """p=1 on a 5x7 image and p=2 on a 3x5 one pad to the same 7x9 scratch shape: the second
    must still see zeros in its border."""
    x = rng.standard_normal((1, 3, 5, 2))
    with fast.use_engine("im2col"):
        reference = make_conv(2, 2, 5, seed=3).forward(x)
    with fast.use_engine("gemm"):
        make_conv(2, 2, 3).forward(rng.standard_normal((1, 5, 7, 2)) + 10.0)
        np.testing.assert_allclose(make_conv(2, 2, 5, seed=3).forward(x), reference, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The worker pool

def test_split_covers_the_range_in_order():
    for n, pieces in [(10, 3), (2, 8), (7, 7), (1, 4)]:
        parts = parallel.split(n, pieces)
        assert len(parts) == min(n, pieces)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


@pytest.mark.parametrize("N,rows,per_row,target", [(32, 8, 8, 455), (16, 32, 32, 4096), (1, 30, 64, 256),
                                                    (3, 16, 16, 100), (7, 5, 5, 10)])
def test_pieces_cover_the_work_in_a_multiple_of_the_workers(N, rows, per_row, target, use_workers):
    """Every (image, row) exactly once; as many pieces as asked for by `target`, at least two per
    worker, rounded up to a multiple of the workers where the images allow (none waits alone)."""
    use_workers(2)
    like = np.empty(1, dtype=np.float32)
    work = parallel.pieces(N, rows, per_row, like, target=target)
    covered = np.zeros((N, rows), dtype=int)
    for n, y in work:
        covered[n, y] += 1
    assert (covered == 1).all()
    want = max(4, -(-N * rows * per_row // target))
    rounded = -(-want // 2) * 2
    assert len(work) >= min(N, rounded)
    if N >= rounded:  # enough whole images: exactly that many pieces, a multiple of the workers
        assert len(work) == rounded


def test_run_calls_every_task_once(workers):
    seen = np.zeros(25, dtype=int)

    def task(i: int) -> None:
        seen[i] += 1

    parallel.run(task, 25)
    assert np.all(seen == 1)


@pytest.mark.parametrize("engine", ["gemm", "winograd"])
def test_network_step_same_with_one_worker_or_several(engine, rng, use_workers):
    """A training step's output, gradients and updated weights do not depend on how the work
    is split (up to rounding: the per-worker partial sums add in another order)."""
    lightness = rng.uniform(-1, 1, (3, 8, 8, 1))
    d_ab = rng.standard_normal((3, 8, 8, 2))
    results = []
    for threads in (1, 3):
        use_workers(threads)
        model = ColorNet((4, 16, 16), seed=2, dtype=np.float64, arch="seed").train()
        optimizer = Adam(model.param_layers, lr=1e-2)
        with fast.use_engine(engine):
            ab = model.forward(lightness)
            model.backward(d_ab)
        grads = [layer.grads[name].copy() for layer in model.param_layers for name in ("W", "b")]
        optimizer.step()
        weights = [layer.params["W"].copy() for layer in model.param_layers]
        results.append((ab, grads, weights))
    assert all(layer.cache[0] == engine for layer in model.param_layers)
    (ab_one, grads_one, weights_one), (ab_several, grads_several, weights_several) = results
    np.testing.assert_allclose(ab_one, ab_several, rtol=1e-12, atol=1e-13)
    for one, several in zip(grads_one, grads_several):
        np.testing.assert_allclose(one, several, rtol=1e-12, atol=1e-13)
    # Adam's first step is lr * g / (|g| + eps): rounding in a near-zero g moves it by up to ~lr * 1e-7.
    for one, several in zip(weights_one, weights_several):
        np.testing.assert_allclose(one, several, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Max-pool, upsample, ReLU

def loop_maxpool(x: np.ndarray) -> tuple:
    """Reference 2x2 max-pool by loops; backward of ones routes to the first maximum in
    row-major window order. Returns (out, mask of receivers)."""
    N, H, W, C = x.shape
    out = np.zeros((N, H // 2, W // 2, C))
    mask = np.zeros(x.shape, dtype=bool)
    for n in range(N):
        for y in range(H // 2):
            for xx in range(W // 2):
                for c in range(C):
                    window = x[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c].ravel()
                    first = int(np.argmax(window))
                    out[n, y, xx, c] = window[first]
                    mask[n, 2 * y + first // 2, 2 * xx + first % 2, c] = True
    return out, mask


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 9, 7, 2), (3, 2, 2, 1)])
@pytest.mark.parametrize("engine", ["im2col", "auto"], ids=["textbook", "fast"])
def test_maxpool_matches_loop_reference_with_many_ties(shape, engine, workers, rng):
    x = rng.integers(0, 3, shape).astype(np.float64)  # three values: ties in most windows
    x = np.maximum(x - 1, 0)                         # and zeros as after a ReLU
    pool = MaxPool2d()
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    with fast.use_engine(engine):
        out = pool.forward(x)
        dx = pool.backward(dout)
    expected_out, mask = loop_maxpool(x)
    np.testing.assert_array_equal(out, expected_out)
    # Each receiver gets its window's gradient; every other pixel gets zero.
    expected_dx = np.zeros_like(x)
    N, H2, W2, C = out.shape
    for n in range(N):
        for y in range(H2):
            for xx in range(W2):
                for c in range(C):
                    block = mask[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c]
                    expected_dx[n, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2, c][block] = dout[n, y, xx, c]
    np.testing.assert_array_equal(dx, expected_dx)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 9, 7, 2), (3, 2, 2, 1)])
def test_relu_then_maxpool_backward_in_one_pass(shape, workers, rng):
    """fast.maxpool_relu_backward = the ReLU's backward of the pool's, where windows hold ties
    and all-zero windows (whose gradient the ReLU stops); None unless the pool read that ReLU's output."""
    x = rng.integers(-2, 3, shape).astype(np.float64)
    relu, pool = ReLU(), MaxPool2d()
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    out = pool.forward(relu.forward(x))
    assert (out == 0).any() and (out > 0).any()
    expected = relu.backward(pool.backward(dout))
    np.testing.assert_array_equal(fast.maxpool_relu_backward(pool, relu, dout), expected)
    pool.forward(relu.forward(x) + 0)  # another array than the ReLU's output
    assert fast.maxpool_relu_backward(pool, relu, dout) is None
    assert fast.maxpool_relu_backward(pool, MaxPool2d(), dout) is None


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (5, 8, 2, 2), (1, 9, 7, 2)])
def test_maxpool_backward_plus_another_gradient(shape, workers, rng):
    """fast.maxpool_backward_plus = the pool's backward + the skip's gradient, `plus` left as it
    was; None on odd sizes and after a textbook forward (the caller adds them)."""
    x = rng.integers(0, 3, shape).astype(np.float64)  # ties
    pool = MaxPool2d()
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    plus = rng.standard_normal(shape)
    plus_before = plus.copy()
    pool.forward(x)
    got = fast.maxpool_backward_plus(pool, dout, plus)
    if shape[1] % 2 or shape[2] % 2:
        assert got is None
        return
    np.testing.assert_array_equal(got, pool.backward(dout) + plus)
    np.testing.assert_array_equal(plus, plus_before)
    with fast.use_engine("im2col"):
        pool.forward(x)
    assert fast.maxpool_backward_plus(pool, dout, plus) is None


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 5, 3, 2)])
@pytest.mark.parametrize("engine", ["im2col", "auto"], ids=["textbook", "fast"])
def test_upsample_repeats_forward_and_sums_blocks_backward(shape, engine, workers, rng):
    N, H, W, C = shape
    x = rng.standard_normal(shape)
    up = Upsample2d()
    dout = rng.standard_normal((N, 2 * H, 2 * W, C))
    with fast.use_engine(engine):
        out, dx = up.forward(x), up.backward(dout)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
    np.testing.assert_allclose(dx, dout.reshape(N, H, 2, W, 2, C).sum(axis=(2, 4)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 2, 3), (4, 6)])
@pytest.mark.parametrize("engine", ["im2col", "auto"], ids=["textbook", "fast"])
def test_relu_forward_and_backward(shape, engine, workers, rng):
    x = rng.standard_normal(shape)
    relu = ReLU()
    dout = rng.standard_normal(x.shape)
    with fast.use_engine(engine):
        out, dx = relu.forward(x), relu.backward(dout)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0))


# ---------------------------------------------------------------------------------------------
# Adam

class _Holder:
    def __init__(self, params: dict):
        self.params = params
        self.grads = {name: None for name in params}


def test_adam_matches_textbook_update(workers, rng):
    layers = [_Holder({"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}),
              _Holder({"W": rng.standard_normal((2, 2, 5))})]
    lr, betas, eps, steps = 0.05, (0.8, 0.95), 1e-6, 4
    grads = [{name: [rng.standard_normal(p.shape) for _ in range(steps)] for name, p in layer.params.items()}
             for layer in layers]
    expected = [{name: adam_reference(p.copy(), grads[i][name], lr, *betas, eps) for name, p in layer.params.items()}
                for i, layer in enumerate(layers)]
    adam = Adam(layers, lr=lr, betas=betas, eps=eps)
    for t in range(steps):
        for i, layer in enumerate(layers):
            for name in layer.params:
                layer.grads[name] = grads[i][name][t]
        adam.step()
        for i, layer in enumerate(layers):
            for name, p in layer.params.items():
                np.testing.assert_allclose(p, expected[i][name][t], rtol=1e-12, atol=1e-12)


def test_adam_updates_parameters_in_place_and_keeps_grads(rng):
    layer = _Holder({"W": rng.standard_normal((4, 3))})
    weights = layer.params["W"]
    layer.grads["W"] = g = rng.standard_normal((4, 3))
    g_before = g.copy()
    adam = Adam([layer], lr=0.1)
    adam.step()
    assert layer.params["W"] is weights        # the layer's array itself moved
    np.testing.assert_array_equal(g, g_before)  # the gradient is left as it was
    state = adam.state_dict()
    fresh = Adam([_Holder({"W": weights.copy()})], lr=0.1)
    fresh.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    assert fresh.t == 1
    np.testing.assert_array_equal(fresh.m[0], adam.m[0])
    np.testing.assert_array_equal(fresh.v[0], adam.v[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_wait_on_parent_workers(use_workers):
    """Threads do not survive fork: a child must not hand tasks to the parent's pool.

    The child first checks that no pool thread it could hand work to is dead (that is what
    would make it hang), then runs tasks on its own pool. The parent blocks on waitpid, with no
    deadline of its own: an alarm in the child turns a hang into a failure after 120 s.
    """
    use_workers(2)
    parallel.run(lambda i: None, 4)  # the parent's pool threads exist now
    pid = os.fork()
    if pid == 0:  # child: exit 0 once the work is done on live threads
        code = 1
        try:
            signal.alarm(120)
            pool = parallel._state["pool"]
            if pool is not None and not all(helper.thread.is_alive() for helper in pool.helpers):
                os._exit(3)  # would hand tasks to the parent's threads, which the child lacks
            done, ran_on = [], set()
            parallel.run(lambda i: (done.append(i), ran_on.add(threading.get_ident())), 4)
            alive = {t.ident for t in threading.enumerate()}
            code = 0 if sorted(done) == [0, 1, 2, 3] and ran_on <= alive else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), "the forked child hung waiting for the parent's worker threads"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child exit status {os.WEXITSTATUS(status)}"


# Allocates 80 MB before and after keep_large_arrays_in_heap(), printing how many bytes glibc
# holds in mmap()ed blocks after each (mallinfo2().hblkhd).
_HEAP_PROBE = """
import ctypes, numpy as np
from nanocolor.fast import parallel
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
mapped = lambda: libc.mallinfo2().hblkhd
base = mapped()
a = np.ones(20_000_000, dtype=np.float32)
before = mapped() - base
del a
took = parallel.keep_large_arrays_in_heap()
base = mapped()
b = np.ones(20_000_000, dtype=np.float32)
print(before, mapped() - base, took)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_arrays_are_kept_in_the_heap():
    """An 80 MB array is a fresh mmap() by default; after keep_large_arrays_in_heap() it is not."""
    result = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=60)
    if "mallinfo2" in result.stderr:
        pytest.skip("glibc older than 2.33: no mallinfo2")
    assert result.returncode == 0, result.stderr
    before, after, took = result.stdout.split()
    assert took == "True"
    assert int(before) >= 80_000_000  # the default: a mapping of its own
    assert int(after) == 0            # now served from the heap


# ---------------------------------------------------------------------------------------------
# Weights prepared once for inference

def test_prepared_is_made_once_per_set_of_values(rng):
    from nanocolor.fast import workspace
    w = rng.standard_normal((3, 3, 4, 5))
    calls = []
    make = lambda a: calls.append(1) or a * 2
    first = workspace.prepared("test", (w,), make)
    assert workspace.prepared("test", (w,), make) is first and len(calls) == 1
    w[1, 2, 3, 4] += 1  # changed in place: noticed, made again
    np.testing.assert_array_equal(workspace.prepared("test", (w,), make), w * 2)
    assert len(calls) == 2
    other = w.copy()  # equal values elsewhere: its own entry, the same numbers
    np.testing.assert_array_equal(workspace.prepared("test", (other,), make), w * 2)
    arrays = [np.full(3, float(i)) for i in range(workspace.PREPARED_ENTRIES + 5)]  # alive: each its own key
    for a in arrays:  # the oldest entries go
        workspace.prepared("test", (a,), make)
    assert len(workspace._prepared) == workspace.PREPARED_ENTRIES


@pytest.mark.parametrize("arch", ["seed", "unet"])
def test_inference_after_training_steps_uses_the_new_weights(arch, rng):
    """Eval, a training step (Adam changes the weights in place), eval again: each time the
    textbook network's output, never transforms prepared from the old weights."""
    model = ColorNet((16, 16, 32), arch=arch, seed=2, dtype=np.float64)
    lightness = rng.uniform(-1, 1, (2, 16, 16, 1))
    optimizer = Adam(model.param_layers, lr=1e-2)
    for _ in range(2):
        model.eval()
        with fast.use_engine("im2col"):
            expected = model.forward(lightness)
        np.testing.assert_allclose(model.forward(lightness), expected, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(model.forward(lightness), expected, rtol=1e-11, atol=1e-12)
        model.train()
        model.backward(model.forward(lightness) - 0.5)
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# Per-channel and ReLU passes over long rows

@pytest.mark.parametrize("shape", [(3, 5, 7, 32), (1, 1, 1, 3), (2, 64, 64, 8), (4, 9, 128)])
def test_per_channel_and_relu_give_numpys_broadcasting(shape, rng):
    """Rows of LONG_ROWS values plus a shorter rest, in place or not, and strided views (which
    fall back to plain broadcasting): the numbers of a * vector, a - vector and max(a, 0)."""
    from nanocolor.fast.gemm import LONG_ROWS, channel_rows, per_channel, relu_into
    a = rng.standard_normal(shape).astype(np.float32)
    vector = rng.standard_normal(shape[-1]).astype(np.float32)
    row = channel_rows(vector)
    assert row.shape[0] >= LONG_ROWS and row.shape[0] % shape[-1] == 0
    for op in (np.multiply, np.subtract):
        out = np.empty_like(a)
        per_channel(op, a, row, out)
        np.testing.assert_array_equal(out, op(a, vector))
        strided = a[..., ::2, :]
        out = np.empty_like(strided)
        per_channel(op, strided, row, out)
        np.testing.assert_array_equal(out, op(strided, vector))
    b = a.copy()
    per_channel(np.add, b, row, b)
    np.testing.assert_array_equal(b, a + vector)
    relu_into(a, b)
    np.testing.assert_array_equal(b, np.maximum(a, 0))
    untouched = a[..., 1::2, :].copy()
    view = a[..., ::2, :]
    relu_into(view, view)  # in place through a strided view
    assert (view >= 0).all()
    np.testing.assert_array_equal(a[..., 1::2, :], untouched)


@pytest.mark.parametrize("m, n, k", [(9, 4, 5000), (3, 2, 20000), (64, 576, 3000)])
def test_thin_products_in_chunks_add_up_to_the_product(m, n, k, rng, monkeypatch):
    """add_thin_product adds a @ b into acc in chunks of K (with a lower SMALL_PRODUCT: 1024 and
    6144 columns, a last shorter chunk included), or in one call for wide products; a may be a
    transposed view, as the weight gradients pass it."""
    from nanocolor.fast import gemm
    monkeypatch.setattr(gemm, "SMALL_PRODUCT", 1024 * 9 * 4)
    a, b = rng.standard_normal((k, m)).T, rng.standard_normal((k, n))
    acc = rng.standard_normal((m, n))
    expected = acc + a @ b
    gemm.add_thin_product(a, b, acc)
    np.testing.assert_allclose(acc, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b_shape", [(6, 5000), (6, 4, 3001), (4, 6, 7)])
def test_small_matmul_in_column_chunks_is_the_product(b_shape, rng, monkeypatch):
    """small_matmul writes a @ b chunk by chunk of b's columns (here of 1000, with a lower
    SMALL_PRODUCT, a shorter last one included), for a small a that may be a transposed view
    and b a matrix or a stack of them, as Winograd's transforms call it."""
    from nanocolor.fast import gemm
    monkeypatch.setattr(gemm, "SMALL_PRODUCT", 1000 * 6 * b_shape[-2])
    a = rng.standard_normal((b_shape[-2], 6)).T
    b = rng.standard_normal(b_shape)
    out = np.full(b_shape[:-2] + (6, b_shape[-1]), np.nan)
    gemm.small_matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
