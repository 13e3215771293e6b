"""Training curves as a picture: train/validation loss and validation PSNR per epoch.

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
    """PNG bytes of two panels from a run's log rows (epoch, train_loss, val_loss, val_psnr), or
    None when matplotlib is missing or there is nothing to draw. A run without a validation set
    (val_loss None) gets one panel: its training loss."""
    if not history or not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure

    epochs = [int(row["epoch"]) for row in history]
    column = lambda key: [math.nan if row.get(key) is None else float(row[key]) for row in history]
    validated = any(math.isfinite(v) for v in column("val_loss"))  # a run without a validation set has none
    fig = Figure(figsize=(9 if validated else 4.8, 3.4), dpi=100)
    axes = fig.subplots(1, 2) if validated else [fig.subplots(1, 1)]
    loss_ax = axes[0]
    loss_ax.plot(epochs, column("train_loss"), "o-", label="train")
    if validated:
        loss_ax.plot(epochs, column("val_loss"), "s-", label="validation")
        axes[1].plot(epochs, column("val_psnr"), "s-", color="tab:green")
        axes[1].set(xlabel="epoch", ylabel="dB", title="validation PSNR (RGB)")
    loss_ax.set(xlabel="epoch", ylabel="MSE of scaled a*b*", title="loss")
    loss_ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
