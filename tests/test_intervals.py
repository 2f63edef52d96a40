"""eval/intervals.py against hand-computed values and independent references: the Wilson interval by its formula's
known values, McNemar by the binomial sums written out, the paired bootstrap against the paired normal interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perceptio_dist.eval.intervals import mcnemar_p, paired_difference, wilson


def test_wilson_by_hand():
    # 8 of 10: centre (0.8 + 1.92/10) / 1.384, half 1.96 sqrt(0.016 + 0.0096) / 1.384 (z = 1.96 rounded)
    low, high = wilson(8, 10, z=1.96)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and 0.15 < wilson(0, 20)[1] < 0.17  # sound at 0 %: not [0, 0]
    assert wilson(20, 20)[1] == 1.0 and wilson(20, 20)[0] == pytest.approx(1 - wilson(0, 20)[1])
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_mcnemar_by_hand():
    # 6 items only a gets right, 1 only b: p = 2 (C(7,0) + C(7,1)) / 2^7 = 0.125
    a = [True] * 6 + [False] + [True] * 5 + [False] * 3
    b = [False] * 6 + [True] + [True] * 5 + [False] * 3
    assert mcnemar_p(a, b) == pytest.approx(0.125)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p([True] * 20, [False] * 20) == pytest.approx(2 * 0.5 ** 20)


def test_paired_bootstrap_matches_the_paired_normal_interval():
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.7
    b = np.where(rng.random(400) < 0.8, a, ~a)  # the same items, 20 % answered the other way
    d = paired_difference(a.tolist(), b.tolist())
    diffs = a.astype(float) - b.astype(float)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert d.difference == pytest.approx(diffs.mean())
    assert d.low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.01)
    assert d.high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.01)
    assert d.count == 400 and d == paired_difference(a.tolist(), b.tolist())  # fixed seed: the same interval
    same = paired_difference([True, False] * 10, [True, False] * 10)
    assert (same.difference, same.low, same.high, same.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([True], [True, False])
