"""How sure a figure is: 95 % Wilson intervals of an accuracy, and the paired difference of two answers to the same
items (a paired bootstrap over the items with a fixed seed, and the exact McNemar test beside it).

Two models, or a model before and after an intervention, answered the same items: their accuracies are not
independent, so their difference is judged on the items (which one got right that the other did not), never by
comparing two separate intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_SEED = 0  # fixed: the same items give the same interval on every run and machine
BOOTSTRAP_RESAMPLES = 10_000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0 % and 100 % and for small n, unlike p ± z·se)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value: under "no difference" the discordant items split 50/50."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """accuracy(a) - accuracy(b) on the same items, with its 95 % paired-bootstrap interval and McNemar's p."""

    difference: float
    low: float
    high: float
    mcnemar_p: float
    count: int

    def to_json(self) -> dict:
        return {"difference": self.difference, "ci": [self.low, self.high], "mcnemar_p": self.mcnemar_p,
                "count": self.count}


def paired_difference(a: Sequence[bool], b: Sequence[bool], seed: int = BOOTSTRAP_SEED,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> PairedDifference:
    """The paired difference of two answer sets to the same items (a[i] and b[i]: item i right)."""
    if len(a) != len(b):
        raise ValueError(f"paired answers need the same items: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        nan = float("nan")
        return PairedDifference(nan, nan, nan, 1.0, 0)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    differences = x[picks].mean(axis=1) - y[picks].mean(axis=1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return PairedDifference(float(x.mean() - y.mean()), float(low), float(high), mcnemar_p(a, b), n)
