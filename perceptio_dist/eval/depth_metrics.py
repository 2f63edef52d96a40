"""Depth metrics for affine-invariant predictions.

Predictions are normalised inverse depth (higher = nearer). ``align_to_depth`` fits a per-image
scale and shift in inverse-depth space by least squares on valid pixels (the MiDaS protocol) and
converts to depth; AbsRel and delta<1.25 are then computed on valid pixels.

Marked-point ordering accuracy: sets of k points on valid pixels, pairwise at least ``min_distance``
pixels apart, whose ground-truth depths pairwise differ by at least ``min_ratio`` (10%); a set is
right when the prediction's nearest point (largest inverse depth) is the ground truth's nearest.
Ties in the prediction resolve to the first point, so a constant map scores 1/k.
"""

from __future__ import annotations

import numpy as np


def align_to_depth(pred_inverse: np.ndarray, depth: np.ndarray, valid: np.ndarray,
                   min_depth: float = 1e-3) -> np.ndarray:
    """Scale and shift ``pred_inverse`` to the ground truth's inverse depth, return depth (metres)."""
    x = pred_inverse[valid].astype(np.float64)
    y = 1.0 / depth[valid].astype(np.float64)
    a = np.stack([x, np.ones_like(x)], 1)
    (scale, shift), *_ = np.linalg.lstsq(a, y, rcond=None)
    inverse = scale * pred_inverse.astype(np.float64) + shift
    inverse = np.clip(inverse, 1.0 / depth[valid].max() / 10, None)  # keep depths positive and bounded
    return np.maximum(1.0 / inverse, min_depth).astype(np.float32)


def abs_rel(pred: np.ndarray, depth: np.ndarray, valid: np.ndarray) -> float:
    return float(np.mean(np.abs(pred[valid] - depth[valid]) / depth[valid]))


def delta1(pred: np.ndarray, depth: np.ndarray, valid: np.ndarray, threshold: float = 1.25) -> float:
    ratio = np.maximum(pred[valid] / depth[valid], depth[valid] / pred[valid])
    return float(np.mean(ratio < threshold))


def sample_point_sets(depth: np.ndarray, valid: np.ndarray, k: int, count: int, rng: np.random.Generator,
                      min_distance: float = 20.0, min_ratio: float = 0.10, max_tries: int = 200_000) -> np.ndarray:
    """``count`` sets of k (y, x) points meeting the distance and depth-difference rules: [count, k, 2]."""
    ys, xs = np.nonzero(valid)
    sets, tries = [], 0
    while len(sets) < count and tries < max_tries:
        tries += 1
        idx = rng.choice(len(ys), size=k, replace=False)
        py, px = ys[idx], xs[idx]
        if k > 1:
            dist = np.hypot(py[:, None] - py[None], px[:, None] - px[None])
            if dist[np.triu_indices(k, 1)].min() < min_distance:
                continue
            d = np.sort(depth[py, px])
            if np.any(d[1:] < (1 + min_ratio) * d[:-1]):
                continue
        sets.append(np.stack([py, px], 1))
    if len(sets) < count:
        raise ValueError(f"only {len(sets)} of {count} {k}-point sets meet the rules on this frame")
    return np.stack(sets)


def ordering_accuracy(pred_inverse: np.ndarray, depth: np.ndarray, point_sets: np.ndarray) -> float:
    """Fraction of sets whose predicted nearest point (argmax inverse depth) is the true nearest (argmin depth)."""
    py, px = point_sets[..., 0], point_sets[..., 1]
    predicted = np.argmax(pred_inverse[py, px], axis=1)
    truth = np.argmin(depth[py, px], axis=1)
    return float(np.mean(predicted == truth))
