"""Paired comparison of two models on the same test images (tasks.metrics): hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tasks.metrics import paired_accuracy_difference, paired_seed_differences

A = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
B = [1, 0, 1, 1, 1, 0, 1, 1, 1, 1]


def test_hand_computed_paired_difference():
    r = paired_accuracy_difference(np.array(A, bool), np.array(B, bool))
    # a right / b wrong: image 1; b right / a wrong: images 2, 3, 8.
    assert (r.n, r.a_only, r.b_only, r.discordant) == (10, 1, 3, 4)
    assert (r.acc_a, r.acc_b) == pytest.approx((0.6, 0.8))
    assert r.diff == pytest.approx(0.2)
    # d = [0,-1,1,1,0,0,0,0,1,0]: mean 0.2, sample variance (4 - 10 * 0.04) / 9 = 0.4, se = sqrt(0.4 / 10).
    assert r.se == pytest.approx(0.2)
    assert r.z == pytest.approx(1.0)
    assert r.ci95() == pytest.approx((0.2 - 1.959964 * 0.2, 0.2 + 1.959964 * 0.2))
    # McNemar exact: 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5 / 16.
    assert r.mcnemar_p == pytest.approx(10 / 16)
    assert r.discordant_fraction == pytest.approx(0.4)
    # 0/1 lists are accepted as well as booleans; swapping the models flips the sign only.
    s = paired_accuracy_difference(B, A)
    assert (s.diff, s.se, s.a_only, s.b_only, s.mcnemar_p) == pytest.approx((-0.2, 0.2, 3, 1, 10 / 16))


def test_agreeing_models_have_zero_difference_and_error():
    c = np.array([True, False, True, True])
    r = paired_accuracy_difference(c, c)
    assert (r.diff, r.se, r.discordant, r.mcnemar_p) == (0.0, 0.0, 0, 1.0)
    assert math.isnan(r.z)
    one = paired_accuracy_difference([True], [False])
    assert one.diff == -1.0 and math.isnan(one.se)  # one image: no variance estimate


def test_matches_scipy_paired_t_test_and_binomial_test():
    rng = np.random.default_rng(0)
    n = 700
    a = rng.random(n) < 0.75
    # b agrees with a on most images, fixes some of a's errors and makes a few new ones.
    flip = rng.random(n) < np.where(a, 0.06, 0.35)
    b = np.where(flip, ~a, a)
    r = paired_accuracy_difference(a, b)
    d = b.astype(float) - a.astype(float)
    assert r.diff == pytest.approx(d.mean())
    assert r.se == pytest.approx(stats.sem(d))
    t = stats.ttest_rel(b.astype(float), a.astype(float))
    assert r.se == pytest.approx(d.mean() / t.statistic)  # the paired t-test's standard error
    assert r.z == pytest.approx(t.statistic)
    assert r.mcnemar_p == pytest.approx(stats.binomtest(r.b_only, r.discordant, 0.5).pvalue)
    # The rule of thumb behind test-set sizing: se ~ sqrt(discordant fraction / n) for small differences,
    # exactly sqrt((discordant fraction - diff^2) / (n - 1)).
    assert r.se == pytest.approx(math.sqrt((r.discordant_fraction - r.diff ** 2) / (n - 1)))
    assert r.se == pytest.approx(math.sqrt(r.discordant_fraction / n), rel=0.05)


def test_seed_differences_hand_computed_and_scipy():
    a = [0.70, 0.72, 0.74]
    b = [0.72, 0.75, 0.75]
    r = paired_seed_differences(a, b)
    assert r.k == 3 and r.diffs == pytest.approx((0.02, 0.03, 0.01))
    assert r.mean == pytest.approx(0.02)
    assert r.std == pytest.approx(0.01)
    assert r.se == pytest.approx(0.01 / math.sqrt(3))
    t = stats.ttest_rel(b, a)
    assert r.t == pytest.approx(t.statistic)
    one = paired_seed_differences([0.7], [0.8])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.std) and math.isnan(one.se) and math.isnan(one.t)


@pytest.mark.parametrize("call, message", [
    (lambda: paired_accuracy_difference([True, False], [True]), "same images"),
    (lambda: paired_accuracy_difference([], []), "no images"),
    (lambda: paired_accuracy_difference([0, 2], [1, 1]), "correctness"),
    (lambda: paired_seed_differences([0.7, 0.8], [0.7]), "seed by seed"),
    (lambda: paired_seed_differences([], []), "no seeds"),
    (lambda: paired_seed_differences([0.7, float("nan")], [0.7, 0.8]), "finite"),
])
def test_bad_inputs_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
