"""Training curves as a picture: train/validation loss and validation PSNR per epoch, and for a
--gan run the critic's loss and the generator's adversarial loss.

matplotlib is an optional extra (`pip install 'nanocolor[plots]'`); without it `curves_png`
returns None and training goes on without the picture.
"""
from __future__ import annotations

import io
import math


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curves_png(history: list[dict], title: str = "") -> bytes | None:
    """PNG bytes of a run's log rows (epoch, train_loss, val_loss, val_psnr) as panels: the losses,
    the validation PSNR unless the run has no validation set (val_loss None), and a GAN's
    critic_loss and adv_loss when the rows have them; None when matplotlib is missing or there is
    nothing to draw."""
    if not history or not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure

    epochs = [int(row["epoch"]) for row in history]
    column = lambda key: [math.nan if row.get(key) is None else float(row[key]) for row in history]
    validated = any(math.isfinite(v) for v in column("val_loss"))  # a run without a validation set has none
    gan = "critic_loss" in history[-1]
    panels = 1 + validated + gan
    fig = Figure(figsize=(4.5 * panels, 3.4), dpi=100)
    axes = list(fig.subplots(1, panels)) if panels > 1 else [fig.subplots(1, 1)]
    loss_ax = axes[0]
    loss_ax.plot(epochs, column("train_loss"), "o-", label="train")
    if validated:
        loss_ax.plot(epochs, column("val_loss"), "s-", label="validation")
        axes[1].plot(epochs, column("val_psnr"), "s-", color="tab:green")
        axes[1].set(xlabel="epoch", ylabel="dB", title="validation PSNR (RGB)")
    loss_ax.set(xlabel="epoch", ylabel="MSE of scaled a*b*", title="loss")
    loss_ax.legend()
    if gan:  # rows before the GAN's warm-up ended have an adv_loss the generator did not train on
        gan_ax = axes[-1]
        gan_ax.plot(epochs, column("critic_loss"), "o-", color="tab:red", label="critic (real vs generated)")
        gan_ax.plot(epochs, column("adv_loss"), "s-", color="tab:purple", label="generator's adversarial term")
        gan_ax.axhline(0.6931, color="gray", ls=":", label="ln 2: a coin toss")
        gan_ax.set(xlabel="epoch", ylabel="binary cross-entropy", title="GAN losses")
        gan_ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
