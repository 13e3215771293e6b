"""Training curves as a picture: train/validation loss and validation PSNR per epoch, and for a
--gan run the critic's loss and the generator's adversarial loss.

matplotlib is an optional extra (`pip install 'nanocolor[plots]'`); without it `curves_png`
returns None and training goes on without the picture.
"""
from __future__ import annotations

import io


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curves_png(history: list[dict], title: str = "") -> bytes | None:
    """PNG bytes of two panels from a run's log rows (epoch, train_loss, val_loss, val_psnr), a
    third when the rows have a GAN's critic_loss and adv_loss; None when matplotlib is missing or
    there is nothing to draw."""
    if not history or not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure

    epochs = [int(row["epoch"]) for row in history]
    column = lambda key: [float(row[key]) for row in history]
    gan = "critic_loss" in history[-1]
    fig = Figure(figsize=(13.5 if gan else 9, 3.4), dpi=100)
    loss_ax, psnr_ax, *gan_ax = fig.subplots(1, 3 if gan else 2)
    loss_ax.plot(epochs, column("train_loss"), "o-", label="train")
    loss_ax.plot(epochs, column("val_loss"), "s-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="MSE of scaled a*b*", title="loss")
    loss_ax.legend()
    psnr_ax.plot(epochs, column("val_psnr"), "s-", color="tab:green")
    psnr_ax.set(xlabel="epoch", ylabel="dB", title="validation PSNR (RGB)")
    if gan:  # rows before the GAN's warm-up ended have an adv_loss the generator did not train on
        gan_ax[0].plot(epochs, column("critic_loss"), "o-", color="tab:red", label="critic (real vs generated)")
        gan_ax[0].plot(epochs, column("adv_loss"), "s-", color="tab:purple", label="generator's adversarial term")
        gan_ax[0].axhline(0.6931, color="gray", ls=":", label="ln 2: a coin toss")
        gan_ax[0].set(xlabel="epoch", ylabel="binary cross-entropy", title="GAN losses")
        gan_ax[0].legend(fontsize=8)
    for ax in (loss_ax, psnr_ax, *gan_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
