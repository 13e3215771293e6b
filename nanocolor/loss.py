"""The losses: mean squared error (the colorization network's regression loss), the same with a
per-photo chroma term (ChromaMatchedMSELoss), its per-photo log (PhotoLogMSELoss, what PSNR
scores), and binary cross-entropy on logits (the critic's, in gan.py)."""
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


class ChromaMatchedMSELoss(MSELoss):
    """MSE plus a term that asks each photo's predicted a*b* to be as colorful as its truth:

        loss = mean((pred - target)^2) + lam * mean_n (s(pred_n) - s(target_n))^2,
        s(x_n) = sqrt(mean over the photo's H, W, 2 of x_n^2 + eps)   (its RMS chroma)

    MSE alone predicts the mean of the plausible colors, duller than any of them, and the more so
    the less sure the network is. The second term pulls every pixel of a photo outwards along its
    own prediction until the photo's chroma matches the truth's: a gain per photo that the network
    learns from what it sees, where a chroma gain is one number for all.
    forward(pred, target (N, H, W, 2)) -> the loss; backward() -> dloss/dpred (N, H, W, 2).
    """

    EPS = 1e-8  # keeps the gradient of s finite at an all-gray prediction

    def __init__(self, lam: float):
        self.lam = lam

    def forward(self, pred, target):
        xp = array_module(pred)
        mse = super().forward(pred, target)
        self.pred = pred
        self.s_pred = xp.sqrt((pred * pred).mean(axis=(1, 2, 3)) + self.EPS)      # (N,)
        self.s_true = xp.sqrt((target * target).mean(axis=(1, 2, 3)) + self.EPS)
        self.gap = self.s_pred - self.s_true
        return mse + self.lam * (self.gap * self.gap).mean()

    def backward(self):
        n, per_photo = self.pred.shape[0], self.pred[0].size
        # d s_n / d pred_n = pred_n / (per_photo * s_n)
        scale = (2.0 * self.lam / n) * self.gap / (per_photo * self.s_pred)
        return super().backward() + scale[:, None, None, None] * self.pred


class PhotoLogMSELoss:
    """The mean over photos of the log of each photo's squared error, what PSNR scores:

        loss = mean_n log(mse_n + eps),   mse_n = mean over the photo's H, W, 2 of (pred_n - target_n)^2

    A photo's PSNR is -10 log10(mse_n) up to a constant, and a test set's score is the mean of its
    photos' PSNRs, so an error costs more in a photo that is otherwise right (a dull photo painted
    brown) than in one that is wrong anyway. Plain MSE weighs every pixel of the batch alike.
    forward(pred, target (N, H, W, 2)) -> the loss; backward() -> dloss/dpred (N, H, W, 2).
    """

    EPS = 1e-4  # about 1 a*b* unit RMS (scaled by 1/110): below it a photo is as right as uint8 shows

    def forward(self, pred, target):
        self.diff = pred - target
        self.mse = (self.diff * self.diff).mean(axis=(1, 2, 3)) + self.EPS   # (N,)
        return array_module(pred).log(self.mse).mean()

    def backward(self):
        n, per_photo = self.diff.shape[0], self.diff[0].size
        return self.diff * (2.0 / (n * per_photo) / self.mse)[:, None, None, None]


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
