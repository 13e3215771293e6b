"""Mean squared error, the loss the autoencoder is trained with."""
from __future__ import annotations


class MSELoss:
    """loss = mean((pred - target)^2) over every element; backward gives dloss/dpred."""

    def forward(self, pred, target) -> float:
        self.diff = pred - target
        return float((self.diff * self.diff).mean())

    def backward(self):
        return self.diff * (2.0 / self.diff.size)
