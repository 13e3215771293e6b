"""Colorization as classification: the loss of Zhang, Isola and Efros (2016), "Colorful Image Colorization".

Instead of regressing a*b* (whose MSE optimum is a washed-out average of the plausible colors),
the network outputs, per pixel, logits over Q color bins:
- bins: a*b* quantized on a GRID = 10 unit grid; a bin is kept when its 10 x 10 cell holds some
  sRGB color at some lightness (sampled densely in L* and a*b*, see ab_bins);
- targets: each true a*b* is soft-encoded over its NEIGHBORS = 5 nearest bin centers with
  Gaussian weights (SIGMA = 5), normalized to sum 1;
- class rebalancing: rare (saturated) colors weigh more, w ~ 1 / ((1 - lambda) p~ + lambda / Q)
  with p~ the training set's bin distribution smoothed by a Gaussian (sigma 5) and lambda = 0.5,
  scaled so that the expected weight under p~ is 1; a pixel weighs w of its nearest bin;
- decoding: the annealed mean, softmax(logits / T) @ bin centers with T = 0.38, between the
  mean (T = 1, desaturated) and the mode (T -> 0, patchy).
Shape legend: N, H, W = batch, height, width; Q = number of bins; a*b* in LAB units unless "scaled".
"""
from __future__ import annotations

import functools

import numpy as np

from .backend import array_module, to_numpy
from .color import AB_SCALE, in_gamut, scale_ab, unscale_ab
from .loss import ChromaMatchedMSELoss, MSELoss

GRID = 10.0            # bin size in a*b* units
SIGMA = 5.0            # Gaussian of the soft encoding and of the distribution smoothing
NEIGHBORS = 5          # bins sharing each soft-encoded target
REBALANCE_LAMBDA = 0.5  # mix of the smoothed distribution with the uniform one
ANNEAL_T = 0.38        # temperature of the annealed-mean decoding
AB_LIMIT = 115.0       # every sRGB color has |a*|, |b*| < 110, inside the cells of centers -110..110
CHUNK = 16384          # pixels per distance matrix (CHUNK x Q floats)


def ab_bins(grid: float = GRID, samples_per_bin: int = 10, lightness_levels: int = 101) -> np.ndarray:
    """The in-gamut bin centers, (Q, 2) float64, sorted by a* then b* (read-only, computed once).

    a*b* is sampled samples_per_bin times per bin side, at offsets that put every sample inside
    exactly one cell, and at lightness_levels values of L* in [0, 100]; a cell is kept when any
    of its samples is an sRGB color (unclipped LAB -> RGB inside [0, 1]) at some L*.
    With the defaults Q = 258 (a cell only grazed by the gamut can be missed; under 0.002% of the
    8-bit colors fall in such cells, and they are soft-encoded onto the nearest bins).
    """
    return _ab_bins(float(grid), int(samples_per_bin), int(lightness_levels))


@functools.lru_cache(maxsize=None)  # one key per setting, however the arguments were spelled
def _ab_bins(grid: float, samples_per_bin: int, lightness_levels: int) -> np.ndarray:
    step = grid / samples_per_bin
    axis = np.arange(-AB_LIMIT + step / 2, AB_LIMIT, step)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    seen = np.zeros(a.shape, dtype=bool)
    for L in np.linspace(0, 100, lightness_levels):  # one L* plane at a time bounds the memory
        seen |= in_gamut(np.stack([np.full_like(a, L), a, b], axis=-1))
    cells = np.unique(np.rint(np.stack([a[seen], b[seen]], axis=-1) / grid).astype(np.int64), axis=0)
    centers = cells * grid
    centers.setflags(write=False)  # shared by every caller through the cache
    return centers


def _cell_table(centers: np.ndarray, grid: float, margin: int = 0) -> tuple[np.ndarray, int]:
    """Lookup (K, K) from grid cell (a/grid + offset, b/grid + offset) to bin index, -1 where no
    bin; `margin` extra rings of -1 cells around the bins."""
    cells = np.rint(centers / grid).astype(np.int64)
    offset = int(np.abs(cells).max()) + margin
    table = np.full((2 * offset + 1, 2 * offset + 1), -1, dtype=np.int64)
    table[cells[:, 0] + offset, cells[:, 1] + offset] = np.arange(len(centers))
    return table, offset


def _nearest_by_distance(ab, centers, k: int = 1):
    """Brute force: indices (P, k) of the k nearest centers to every row of ab (P, 2), any order."""
    xp = array_module(ab)
    c = xp.asarray(centers, dtype=ab.dtype)
    c_sq = (c * c).sum(1)
    return xp.concatenate([xp.argpartition(c_sq - 2 * ab[s:s + CHUNK] @ c.T, k - 1, axis=1)[:, :k]
                           for s in range(0, len(ab), CHUNK)])


def _cells(flat, grid: float, offset: int, size: int):
    """Table coordinates (P, 2) of each point's grid cell, clipped, and whether it was inside."""
    xp = array_module(flat)
    cell = xp.rint(flat / grid).astype(xp.int64) + offset
    inside = ((cell >= 0) & (cell < size)).all(axis=1)
    return xp.clip(cell, 0, size - 1), inside


def nearest_bin(ab, centers: np.ndarray | None = None, grid: float = GRID):
    """a*b* (..., 2) -> index (...) of the nearest bin center (int64).

    A point whose grid cell is a bin is nearest to that cell's center (the cells are the bins'
    Voronoi regions), so rounding answers almost every pixel; the rest are searched exactly.
    """
    xp = array_module(ab)
    centers = ab_bins(grid) if centers is None else centers
    table, offset = _cell_table(centers, grid)
    flat = ab.reshape(-1, 2)
    if len(flat) == 0:
        return xp.zeros(ab.shape[:-1], dtype=xp.int64)
    cell, inside = _cells(flat, grid, offset, len(table))
    index = xp.asarray(table)[cell[:, 0], cell[:, 1]]
    missing = ~inside | (index < 0)
    if bool(missing.any()):
        index[missing] = _nearest_by_distance(flat[missing], centers)[:, 0]
    return index.reshape(ab.shape[:-1])


def _nearest_bins(flat, centers: np.ndarray, grid: float, k: int):
    """Indices (P, k) of the k nearest centers to each point (P, 2), and their squared distances.

    Candidates are the bins of the 5 x 5 cells around the point's own; any bin outside them is at
    least 2.5 grid units away along a* or b*, so when the k-th candidate is that close the answer
    is exact. Points near the gamut's edge that fail this test are searched among all bins.
    """
    xp = array_module(flat)
    table, offset = _cell_table(centers, grid, margin=2)
    c = xp.asarray(centers, dtype=flat.dtype)
    cell, inside = _cells(flat, grid, offset, len(table))
    ring = np.arange(-2, 3)
    shifts = xp.asarray(np.stack(np.meshgrid(ring, ring, indexing="ij"), axis=-1).reshape(-1, 2))
    around = xp.clip(cell[:, None, :] + shifts, 0, len(table) - 1)             # (P, 25, 2)
    candidates = xp.asarray(table)[around[..., 0], around[..., 1]]            # (P, 25), -1: no bin
    d_sq = ((flat[:, None, :] - c[candidates]) ** 2).sum(-1)
    d_sq = xp.where(candidates >= 0, d_sq, xp.inf)
    pick = xp.argpartition(d_sq, k - 1, axis=1)[:, :k]
    near = xp.take_along_axis(candidates, pick, axis=1)
    d_near = xp.take_along_axis(d_sq, pick, axis=1)
    unsure = ~inside | (d_near.max(axis=1) > (2.5 * grid) ** 2)
    if bool(unsure.any()):
        near[unsure] = _nearest_by_distance(flat[unsure], centers, k)
        d_near[unsure] = ((flat[unsure][:, None, :] - c[near[unsure]]) ** 2).sum(-1)
    return near, d_near


def soft_encode(ab, centers: np.ndarray | None = None, sigma: float = SIGMA, neighbors: int = NEIGHBORS,
                grid: float = GRID):
    """a*b* (..., 2) -> target distribution (..., Q): Gaussian weights on the `neighbors` nearest
    bin centers, exp(-d^2 / (2 sigma^2)), summing to 1; every other bin gets 0."""
    xp = array_module(ab)
    centers = ab_bins(grid) if centers is None else centers
    if not 1 <= neighbors <= min(25, len(centers)):
        raise ValueError(f"neighbors must be between 1 and min(25, Q = {len(centers)}), got {neighbors}")
    flat = ab.reshape(-1, 2)
    near, d_sq = _nearest_bins(flat, centers, grid, neighbors)
    # shifting by the smallest distance keeps far-away points from underflowing to 0 / 0
    w = xp.exp(-(d_sq - d_sq.min(axis=1, keepdims=True)) / (2 * sigma * sigma))
    out = xp.zeros((len(flat), len(centers)), dtype=ab.dtype)
    out[xp.arange(len(flat))[:, None], near] = w / w.sum(axis=1, keepdims=True)
    return out.reshape(*ab.shape[:-1], len(centers))


def empirical_distribution(ab, centers: np.ndarray | None = None, ab_scale: float = 1.0,
                           chunk: int = 1 << 20) -> np.ndarray:
    """Share of pixels whose nearest bin is each bin, (Q,) float64 summing to 1.

    ab (..., 2) times ab_scale must be in LAB units (ab_scale = AB_SCALE for the scaled training
    targets); it is read in chunks, so the whole training set needs no converted copy.
    """
    centers = ab_bins() if centers is None else centers
    flat = ab.reshape(-1, 2)
    counts = np.zeros(len(centers))
    for s in range(0, len(flat), chunk):
        bins = nearest_bin(flat[s:s + chunk] * ab_scale, centers)
        counts += np.bincount(to_numpy(bins), minlength=len(centers))
    if counts.sum() == 0:
        raise ValueError("no pixels to estimate the color distribution from")
    return counts / counts.sum()


def smooth_distribution(p: np.ndarray, centers: np.ndarray | None = None, sigma: float = SIGMA) -> np.ndarray:
    """Blur a bin distribution (Q,) with a Gaussian of sigma a*b* units over the bin centers.

    Each bin's mass is spread over the bins in proportion to exp(-d^2 / (2 sigma^2)), so the
    total stays 1.
    """
    centers = ab_bins() if centers is None else centers
    d_sq = ((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    kernel = np.exp(-d_sq / (2 * sigma * sigma))
    kernel /= kernel.sum(axis=0, keepdims=True)  # column j: where bin j's mass goes
    return kernel @ np.asarray(p, dtype=np.float64)


def rebalancing_weights(p_smooth: np.ndarray, lam: float = REBALANCE_LAMBDA) -> np.ndarray:
    """Class weights (Q,) ~ 1 / ((1 - lam) p~ + lam / Q), scaled so that sum(p~ * w) = 1."""
    p_smooth = np.asarray(p_smooth, dtype=np.float64)
    w = 1.0 / ((1 - lam) * p_smooth + lam / len(p_smooth))
    return w / np.sum(p_smooth * w)


def class_weights(ab, centers: np.ndarray | None = None, ab_scale: float = 1.0, sigma: float = SIGMA,
                  lam: float = REBALANCE_LAMBDA) -> np.ndarray:
    """Rebalancing weights (Q,) estimated from training a*b* (..., 2) (times ab_scale in LAB units)."""
    centers = ab_bins() if centers is None else centers
    return rebalancing_weights(smooth_distribution(empirical_distribution(ab, centers, ab_scale), centers, sigma), lam)


def annealed_mean(logits, centers: np.ndarray | None = None, temperature: float = ANNEAL_T):
    """Bin logits (..., Q) -> a*b* (..., 2): the mean of the centers under softmax(logits / T).

    softmax(logits / T) is the predicted distribution z re-tempered, z^(1/T) / sum z^(1/T).
    """
    xp = array_module(logits)
    centers = ab_bins() if centers is None else centers
    z = logits / temperature
    z = xp.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)) @ xp.asarray(centers, dtype=logits.dtype)


def blended_ab(out, temperature: float, regression_weight: float, centers: np.ndarray | None = None):
    """The output (..., 2 + Q) of a net with a class head -> a*b* (..., 2) in LAB units:
    w * its regressed a*b* + (1 - w) * the annealed mean of its bins at `temperature`.

    The regression is the mean of the plausible colors; the annealed mean leans towards the most
    likely one. Their blend, with w and T chosen on validation photos, is what colorizing paints.
    """
    regressed = unscale_ab(out[..., :2])
    return regression_weight * regressed + (1 - regression_weight) * annealed_mean(out[..., 2:], centers, temperature)


class SoftmaxCrossEntropy:
    """loss = mean over pixels of weight * (-sum_q target_q log softmax(logits)_q).

    forward(logits (N, H, W, Q), target_dist (N, H, W, Q), weights (N, H, W) or None) -> scalar;
    backward() -> dloss/dlogits (N, H, W, Q) = weight * (softmax * sum_q target_q - target) / pixels.
    """

    def forward(self, logits, target_dist, weights=None):
        xp = array_module(logits)
        shifted = logits - logits.max(axis=-1, keepdims=True)  # log-sum-exp without overflow
        log_prob = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
        if weights is None:
            weights = xp.ones(logits.shape[:-1], dtype=logits.dtype)
        self.cache = (log_prob, target_dist, weights)
        return (weights * -(target_dist * log_prob).sum(axis=-1)).mean()  # 0-d on a GPU: no sync here

    def backward(self):
        xp = array_module(self.cache[0])
        log_prob, target, weights = self.cache
        scale = weights[..., None] / weights.size
        return (xp.exp(log_prob) * target.sum(axis=-1, keepdims=True) - target) * scale


class RebalancedLoss:
    """What the two rebalanced losses share: the bin centers (Q, 2) and a weight per bin (Q,),
    all 1 (no rebalancing) unless given or estimated from training targets."""

    def __init__(self, weights: np.ndarray | None = None, centers: np.ndarray | None = None):
        self.centers = ab_bins() if centers is None else centers
        self.weights = np.ones(len(self.centers)) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (len(self.centers),):
            raise ValueError(f"class weights of shape {self.weights.shape} for {len(self.centers)} bins")

    @classmethod
    def from_training_ab(cls, ab_scaled, lam: float = REBALANCE_LAMBDA):
        """The loss with rebalancing weights estimated from the scaled training targets (..., 2)."""
        return cls(class_weights(ab_scaled, ab_scale=AB_SCALE, lam=lam))


class ClassificationLoss(RebalancedLoss):
    """The training loss for a model with Q logit outputs, used like MSELoss on scaled a*b*.

    forward(logits (N, H, W, Q), ab_true (N, H, W, 2) scaled to [-1, 1]) -> float; backward() ->
    dloss/dlogits. Targets are soft-encoded; each pixel weighs the rebalancing weight of its
    nearest bin (the soft target's largest entry). decode(logits) -> scaled a*b* (N, H, W, 2).
    """

    def __init__(self, weights: np.ndarray | None = None, centers: np.ndarray | None = None):
        super().__init__(weights, centers)
        self.cross_entropy = SoftmaxCrossEntropy()

    def forward(self, logits, ab_true) -> float:
        xp = array_module(logits)
        target = soft_encode(unscale_ab(ab_true), self.centers)
        pixel_weights = xp.asarray(self.weights, dtype=logits.dtype)[target.argmax(axis=-1)]
        return self.cross_entropy.forward(logits, target, pixel_weights)

    def backward(self):
        return self.cross_entropy.backward()

    def decode(self, logits, temperature: float = ANNEAL_T):
        return scale_ab(annealed_mean(logits, self.centers, temperature))


class RebalancedMSELoss(RebalancedLoss):
    """MSE on scaled a*b* with each pixel weighed by the rebalancing weight of its true color's
    nearest bin: Zhang et al.'s class rebalancing applied to regression.

    The optimum of a weighted MSE is the weighted mean of the plausible colors; rare (saturated)
    colors weigh more, so where a texture is sometimes red and often beige the prediction moves
    towards red, while a pixel that is always gray keeps its gray. Weights all 1 give MSELoss.
    forward(ab_pred, ab_true (N, H, W, 2) scaled) -> the loss, mean over every element of
    w * (pred - true)^2; backward() -> dloss/dab_pred (N, H, W, 2).
    """

    def forward(self, ab_pred, ab_true):
        xp = array_module(ab_pred)
        bins = nearest_bin(unscale_ab(ab_true), self.centers)
        self.pixel_weights = xp.asarray(self.weights, dtype=ab_pred.dtype)[bins][..., None]  # (N, H, W, 1)
        self.diff = ab_pred - ab_true
        return (self.pixel_weights * self.diff * self.diff).mean()

    def backward(self):
        return self.pixel_weights * self.diff * (2.0 / self.diff.size)


class HybridLoss:
    """The training loss of a net with a class head (ColorNet(class_bins=Q)), both heads at once:

        loss = MSE(a*b* head, truth) + class_weight * cross-entropy(bin logits, soft-encoded truth)

    (with chroma_match > 0 the regression term is ChromaMatchedMSELoss(chroma_match)). Both heads
    read the same features, so the body learns to keep the mean color that the regression needs
    and to tell apart the plausible colors that the bins need. No rebalancing.
    forward(out (N, H, W, 2 + Q), ab_true (N, H, W, 2) scaled) -> the loss; backward() -> dloss/dout;
    decode(out, temperature, regression_weight) -> scaled a*b* (N, H, W, 2), as colorizing paints.
    """

    def __init__(self, class_weight: float, chroma_match: float = 0.0, centers: np.ndarray | None = None):
        self.class_weight = class_weight
        self.regression = ChromaMatchedMSELoss(chroma_match) if chroma_match else MSELoss()
        self.classes = ClassificationLoss(centers=centers)
        self.centers = self.classes.centers

    def forward(self, out, ab_true):
        return (self.regression.forward(out[..., :2], ab_true)
                + self.class_weight * self.classes.forward(out[..., 2:], ab_true))

    def backward(self):
        xp = array_module(self.regression.diff)
        return xp.concatenate([self.regression.backward(), self.class_weight * self.classes.backward()], axis=-1)

    def decode(self, out, temperature: float, regression_weight: float):
        return scale_ab(blended_ab(out, temperature, regression_weight, self.centers))
