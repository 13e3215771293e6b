"""Mean squared error, the loss the autoencoder is trained with."""
from __future__ import annotations


class MSELoss:
    """loss = mean((pred - target)^2) over every element; backward gives dloss/dpred."""

    def forward(self, pred, target):
        """pred, target (N, H, W, 2) -> the loss, a scalar (0-d on a GPU: reading it waits for the GPU)."""
        self.diff = pred - target
        return (self.diff * self.diff).mean()

    def backward(self):
        return self.diff * (2.0 / self.diff.size)
