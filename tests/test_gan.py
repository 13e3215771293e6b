"""Adversarial fine-tuning (nanocolor/gan.py): the PatchGAN critic's shapes and gradients, the
gradient of the whole generator-through-critic chain against central differences, the two
alternating steps, and `train.py --gan` runs: files, settings, resume, Ctrl-C."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GRAD_TOL, check_gradients, make_photos, run_train
from nanocolor.gan import GAN, PatchCritic
from nanocolor.gradcheck import numeric_gradient, relative_error
from nanocolor.loss import BCEWithLogitsLoss, MSELoss
from nanocolor.model import ColorNet
from nanocolor.optim import Adam
from nanocolor.serialize import load_npz
from test_reliability import assert_same_arrays, checkpoint_arrays, train_with_signal

# -- the critic ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,patches", [(16, 16, (4, 4)), (32, 32, (8, 8)), (64, 64, (16, 16)),
                                                  (40, 24, (10, 6)), (36, 22, (9, 6)), (5, 3, (2, 1))])
def test_critic_gives_one_logit_per_patch_at_any_size(height, width, patches, rng):
    critic = PatchCritic((4, 8, 8), seed=0)
    logits = critic.forward(rng.uniform(-1, 1, (3, height, width, 1)).astype(np.float32),
                            rng.uniform(-1, 1, (3, height, width, 2)).astype(np.float32))
    assert logits.shape == (3, *patches, 1) and logits.dtype == np.float32
    assert (critic.output_size(height), critic.output_size(width)) == patches


def test_critic_layers_and_parameters():
    critic = PatchCritic()  # the default: widths 32, 64, 128
    convs = [layer for layer in critic.layers if layer.params]
    assert [(c.k, c.stride, c.padding, c.c_in, c.c_out) for c in convs] == \
        [(3, 2, 1, 3, 32), (3, 2, 1, 32, 64), (3, 1, 1, 64, 128), (3, 1, 1, 128, 1)]
    assert critic.num_params() == 9 * (3 * 32 + 32 * 64 + 64 * 128 + 128) + 32 + 64 + 128 + 1
    with pytest.raises(ValueError):
        PatchCritic((4, 0))


def float64_critic(widths=(3, 4), seed: int = 0) -> PatchCritic:
    critic = PatchCritic(widths, seed=seed, dtype=np.float64)
    for layer in critic.param_layers:  # non-zero biases, so their gradients are exercised
        layer.params["b"] = np.random.default_rng(seed + 1).standard_normal(layer.params["b"].shape) * 0.1
    return critic


class CriticOnAb:
    """The critic as a layer of its ab input (a fixed lightness), for check_gradients."""

    def __init__(self, critic: PatchCritic, lightness: np.ndarray):
        self.critic, self.lightness = critic, lightness
        self.params = {f"{i}.{name}": p for i, layer in enumerate(critic.param_layers) for name, p in layer.params.items()}

    @property
    def grads(self) -> dict:
        return {f"{i}.{name}": g for i, layer in enumerate(self.critic.param_layers) for name, g in layer.grads.items()}

    def forward(self, ab):
        return self.critic.forward(self.lightness, ab)

    def backward(self, dout):
        return self.critic.backward(dout)


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 9, 11), (2, 12, 10)])
def test_critic_gradients(shape, rng):
    """d/d ab and d/d every critic parameter, float64, odd sizes included."""
    critic = float64_critic()
    check_gradients(CriticOnAb(critic, rng.uniform(-1, 1, (*shape, 1))), rng.uniform(-1, 1, (*shape, 2)), rng)


def test_critic_backward_without_input_gradient_fills_the_same_grads(rng):
    critic = float64_critic()
    L, ab = rng.uniform(-1, 1, (2, 8, 8, 1)), rng.uniform(-1, 1, (2, 8, 8, 2))
    dout = rng.standard_normal(critic.forward(L, ab).shape)
    d_ab = critic.backward(dout)
    with_dx = [g.copy() for layer in critic.param_layers for g in layer.grads.values()]
    assert d_ab.shape == ab.shape and critic.backward(dout, input_grad=False) is None
    for g, expected in zip([g for layer in critic.param_layers for g in layer.grads.values()], with_dx):
        np.testing.assert_array_equal(g, expected)


# -- the generator through the critic --------------------------------------------------------------

def tiny_pair(rng, lam: float = 3.0, warmup: int = 0) -> tuple:
    """A float64 U-Net generator, a GAN with a small critic, a batch (N = 2, 8 x 8)."""
    generator = ColorNet((2, 3), arch="unet", seed=3, dtype=np.float64)
    gan = GAN(lam=lam, critic_lr=1e-3, warmup=warmup, widths=(3, 4), seed=5, dtype=np.float64)
    gan.critic = float64_critic()
    gan.optimizer = Adam(gan.critic.param_layers, lr=1e-3, betas=(0.5, 0.999))
    L = rng.uniform(-1, 1, (2, 8, 8, 1))
    ab = rng.uniform(-0.5, 0.5, (2, 8, 8, 2))
    return generator, gan, L, ab


def test_generator_through_critic_gradient_check(rng):
    """GAN.train_step's generator gradient is d/d theta of lam * MSE(G(L), ab) + BCE(D(L, G(L)), 1)
    through the critic as its own step left it: every generator parameter against central
    differences (the optimizer's lr is 0, so the step leaves the parameters where they were)."""
    generator, gan, L, ab = tiny_pair(rng)
    gan.train_step(generator, MSELoss(), Adam(generator.param_layers, lr=0.0), L, ab, step=0)
    analytic = [{name: g.copy() for name, g in layer.grads.items()} for layer in generator.param_layers]

    def total_loss() -> float:
        ab_fake = generator.forward(L)
        return gan.lam * float(MSELoss().forward(ab_fake, ab)) + \
            float(BCEWithLogitsLoss().forward(gan.critic.forward(L, ab_fake), 1.0))

    worst = 0.0
    for i, layer in enumerate(generator.param_layers):
        for name, p in layer.params.items():
            err = relative_error(analytic[i][name], numeric_gradient(total_loss, p))
            assert err < GRAD_TOL, f"generator layer {i} d{name}: relative error {err:.2e}"
            worst = max(worst, err)
    assert len(analytic) == 2 * 3 + 1 and worst > 0  # 3 conv + BatchNorm blocks and the head


def test_critic_step_gradient_and_loss(rng):
    """The critic's step: BCE over N real pairs labelled 1 and N generated ones labelled 0, its
    gradient for every critic parameter against central differences (lr 0: nothing moves)."""
    _, gan, L, ab = tiny_pair(rng)
    ab_fake = rng.uniform(-0.5, 0.5, ab.shape)
    gan.optimizer.lr = 0.0
    loss, fake_logits = gan.critic_step(L, ab, ab_fake)
    analytic = [{name: g.copy() for name, g in layer.grads.items()} for layer in gan.critic.param_layers]
    bce = lambda ab_pair, label: float(BCEWithLogitsLoss().forward(gan.critic.forward(L, ab_pair), label))
    assert loss == pytest.approx((bce(ab, 1.0) + bce(ab_fake, 0.0)) / 2, rel=1e-12)  # pix2pix's halved loss
    np.testing.assert_allclose(fake_logits, gan.critic.forward(L, ab_fake), rtol=1e-12)
    critic_loss = lambda: (bce(ab, 1.0) + bce(ab_fake, 0.0)) / 2
    for i, layer in enumerate(gan.critic.param_layers):
        for name, p in layer.params.items():
            err = relative_error(analytic[i][name], numeric_gradient(critic_loss, p))
            assert err < GRAD_TOL, f"critic layer {i} d{name}: relative error {err:.2e}"


def test_warmup_trains_the_critic_and_the_generator_on_regression_alone(rng):
    """Before step `warmup` the generator's gradient is lam times the MSE's; from it on, the
    adversarial term is added; the critic steps either way."""
    generator, gan, L, ab = tiny_pair(rng, warmup=2)
    critic_before = gan.critic.layers[0].params["W"].copy()
    gan.train_step(generator, MSELoss(), Adam(generator.param_layers, lr=0.0), L, ab, step=1)
    assert not np.array_equal(gan.critic.layers[0].params["W"], critic_before)  # the critic learned
    warm = [g.copy() for layer in generator.param_layers for g in layer.grads.values()]
    loss = MSELoss()
    loss.forward(generator.train().forward(L), ab)
    generator.backward(loss.backward())
    for g, expected in zip(warm, [g for layer in generator.param_layers for g in layer.grads.values()]):
        np.testing.assert_allclose(g, gan.lam * expected, rtol=1e-12, atol=1e-15)
    gan.train_step(generator, MSELoss(), Adam(generator.param_layers, lr=0.0), L, ab, step=2)
    adversarial = [g for layer in generator.param_layers for g in layer.grads.values()]
    assert max(relative_error(a, b) for a, b in zip(adversarial, warm)) > 1e-3
    assert len(gan.loss_sums) == 2 and all(np.isfinite(gan.loss_sums))
    means = gan.take_loss_means(2)
    assert set(means) == {"critic_loss", "adv_loss"} and gan.loss_sums == [0.0, 0.0]


def test_the_critic_learns_to_tell_real_from_gray(rng):
    """A few critic steps on real pairs against the gray prediction (ab = 0): its loss falls from
    about ln 2 (a coin toss) and it scores real pairs above generated ones."""
    gan = GAN(warmup=0, critic_lr=2e-3, widths=(8, 16), seed=0)
    L = rng.uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)
    ab = (0.3 * np.sign(rng.standard_normal((8, 16, 16, 2)))).astype(np.float32)
    gray = np.zeros_like(ab)
    losses = [float(gan.critic_step(L, ab, gray)[0]) for _ in range(40)]
    assert losses[0] > 0.6 and losses[-1] < 0.2
    assert gan.critic.forward(L, ab).mean() > gan.critic.forward(L, gray).mean()


# -- train.py --gan -------------------------------------------------------------------------------

# A tiny GAN run: 12 photos -> 10 train / 2 validation, 5 steps of 2 images per epoch, 16x16.
TINY_GAN = ("--size", "16", "--batch-size", "2", "--val-fraction", "0.2", "--quiet", "--gan",
            "--critic-widths", "4,8,8", "--critic-warmup", "3")


@pytest.fixture(scope="module")
def gan_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gan")
    make_photos(folder / "photos", 12, size=20)
    ColorNet((4, 8), arch="unet", seed=1).save(folder / "init.npz", train_size=16)
    return folder


def test_gan_run_writes_both_networks_to_the_checkpoint_and_the_generator_alone_to_the_model(gan_photos, tmp_path):
    run = tmp_path / "run"
    result = run_train("--data", gan_photos / "photos", "--init", gan_photos / "init.npz", "--out", run,
                       "--epochs", 2, *TINY_GAN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arrays, meta = load_npz(run / "checkpoint.npz")
    assert {"critic.layer0.W", "critic.layer6.b", "critic.adam.t", "critic.adam.m0", "adam.t"} <= set(arrays)
    assert int(arrays["critic.adam.t"]) == int(arrays["adam.t"]) == 10  # one critic step per generator step
    assert meta["train_config"]["gan"] is True and meta["train_config"]["critic_widths"] == [4, 8, 8]
    model_arrays, _ = load_npz(run / "model.npz")
    assert not any(name.startswith("critic") for name in model_arrays)
    assert ColorNet.load(run / "model.npz").config["arch"] == "unet"
    log = (run / "log.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_loss,val_psnr,seconds,critic_loss,adv_loss" and len(log) == 3
    assert all(0 < float(v) < 5 for row in log[1:] for v in row.split(",")[-2:])
    assert (run / "curves.png").stat().st_size > 0


def test_gan_resume_and_an_interrupt_are_bit_identical_to_one_go(gan_photos, tmp_path):
    """Straight 3 epochs; against 1 epoch, a resume stopped by SIGINT inside epoch 2 (before its
    step 3: after the warm-up), and a resume to the end: the same generator, critic and both
    Adam states, bit for bit."""
    common = ["--data", gan_photos / "photos", "--init", gan_photos / "init.npz", *TINY_GAN, "--dtype", "float64"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(*common, "--out", straight, "--epochs", 3, cwd=tmp_path).returncode == 0
    assert run_train(*common, "--out", split, "--epochs", 1, cwd=tmp_path).returncode == 0
    stopped = train_with_signal("--resume", split, "--epochs", 3, "--quiet", cwd=tmp_path, at="2,3,SIGINT")
    assert stopped.returncode == 130 and "interrupted at epoch 2, step 3;" in stopped.stderr, stopped.stderr
    assert run_train("--resume", split, "--quiet", cwd=tmp_path).returncode == 0
    a, b = checkpoint_arrays(split), checkpoint_arrays(straight)
    assert any(name.startswith("critic.adam.m") for name in a)
    assert_same_arrays(a, b)
    rows = lambda run: [row.split(",") for row in (run / "log.csv").read_text().splitlines()[1:]]
    for mine, theirs in zip(rows(split), rows(straight)):  # every column but the seconds
        assert mine[:4] + mine[5:] == theirs[:4] + theirs[5:]


@pytest.mark.parametrize("args,message", [
    (("--gan",), "--gan fine-tunes a trained model: give its weights with --init"),
    (("--gan", "--init", "INIT", "--loss", "classify"), "--gan fine-tunes a regression model"),
    (("--gan-lambda", "10", "--critic-lr", "1e-4"), "--gan-lambda, --critic-lr only apply with --gan"),
    (("--gan", "--init", "INIT", "--critic-lr", "0"), "--critic-lr must be above 0"),
    (("--gan", "--init", "INIT", "--critic-widths", "4,x"), "--critic-widths must be positive integers"),
])
def test_gan_bad_settings_give_one_line_and_exit_2(gan_photos, tmp_path, args, message):
    args = [str(gan_photos / "init.npz") if a == "INIT" else a for a in args]
    result = run_train("--data", gan_photos / "photos", "--out", tmp_path / "run", "--epochs", 1, "--quiet",
                       "--batch-size", 2, *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "run" / "checkpoint.npz").exists()
