"""Training curves as a picture: train/validation loss and validation PSNR per epoch.

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
    """PNG bytes of two panels from a run's log rows (epoch, train_loss, val_loss, val_psnr), or
    None when matplotlib is missing or there is nothing to draw."""
    if not history or not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure

    epochs = [int(row["epoch"]) for row in history]
    column = lambda key: [float(row[key]) for row in history]
    fig = Figure(figsize=(9, 3.4), dpi=100)
    loss_ax, psnr_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, column("train_loss"), "o-", label="train")
    loss_ax.plot(epochs, column("val_loss"), "s-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="MSE of scaled a*b*", title="loss")
    loss_ax.legend()
    psnr_ax.plot(epochs, column("val_psnr"), "s-", color="tab:green")
    psnr_ax.set(xlabel="epoch", ylabel="dB", title="validation PSNR (RGB)")
    for ax in (loss_ax, psnr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
