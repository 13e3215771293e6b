"""The losses: mean squared error (the colorization network's regression loss) and binary
cross-entropy on logits (the critic's, in gan.py)."""
from __future__ import annotations

from .backend import array_module


class MSELoss:
    """loss = mean((pred - target)^2) over every element; backward gives dloss/dpred."""

    def forward(self, pred, target):
        """pred, target (N, H, W, 2) -> the loss, a scalar (0-d on a GPU: reading it waits for the GPU)."""
        self.diff = pred - target
        return (self.diff * self.diff).mean()

    def backward(self):
        return self.diff * (2.0 / self.diff.size)


class BCEWithLogitsLoss:
    """Binary cross-entropy of sigmoid(z) against labels y in [0, 1], the mean over every element:

        loss = mean( -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) )
             = mean( max(z, 0) - z y + log(1 + exp(-|z|)) )

    The second form is the same number without overflow: exp only ever sees -|z| <= 0, and a
    logit of +-1000 gives a finite loss where sigmoid would round to exactly 0 or 1 and its log
    to -inf. Backward: d loss / d z = (sigmoid(z) - y) / count.
    """

    def forward(self, logits, target):
        """logits (any shape), target: the same shape or a number (1 = real, 0 = generated) -> the
        loss, a scalar (0-d on a GPU)."""
        xp = array_module(logits)
        self.logits, self.target = logits, target
        return (xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))).mean()

    def backward(self):
        """d loss / d logits, the logits' shape."""
        xp = array_module(self.logits)
        z, y = self.logits, self.target
        e = xp.exp(-xp.abs(z))   # in (0, 1]: never overflows
        tail = e / (1 + e)       # sigmoid(-|z|), which no rounding turns into 0 before it is tiny
        # sigmoid(z) - y, as (1 - y) - sigmoid(-z) for z >= 0: a real pair scored 40 still pulls
        # by exp(-40), where 1 / (1 + exp(-40)) - 1 would round to exactly 0
        return xp.where(z >= 0, (1 - y) - tail, tail - y) * (1.0 / z.size)
