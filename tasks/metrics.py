"""Classification metrics from a confusion matrix (rows = true class, columns = predicted class).

Mean class accuracy is the mean of the per-class recalls over the classes present in the
evaluated set. A class with no test sample has no accuracy (nan); it is excluded from the mean
rather than counted as 0 or 1, which would bias cross-data-set comparisons (e.g. CK+ subsets).

Paired comparisons (:func:`paired_accuracy_difference`, :func:`paired_seed_differences`) say how
well a difference between two models is measured. Two models scored on the *same* test images are
compared image by image: only the discordant images (one model right, the other wrong) carry
information about the difference, so its standard error is far smaller than that of two
independent accuracies. This is the McNemar view of a paired test; the standard error is that of
the paired t-test on the per-image differences d_i = correct_b - correct_a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PairedComparison", "SeedDifferences", "accuracy", "confusion_matrix", "mean_class_accuracy",
           "paired_accuracy_difference", "paired_seed_differences", "per_class_accuracy", "support"]


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """``num_classes`` x ``num_classes`` int64 counts; entry [t, p] = samples of class t predicted p."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}")
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} labels/predictions are outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def support(conf: np.ndarray) -> np.ndarray:
    return np.asarray(conf).sum(axis=1)


def accuracy(conf: np.ndarray) -> float:
    conf = np.asarray(conf)
    n = conf.sum()
    return float(np.trace(conf) / n) if n else float("nan")


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """Recall per true class; nan for classes with no sample."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.diag(conf) / np.where(n > 0, n, 1), np.nan)


def mean_class_accuracy(conf: np.ndarray) -> float:
    """Mean of per-class accuracies over the classes that have samples (nan if none has)."""
    pc = per_class_accuracy(conf)
    pc = pc[~np.isnan(pc)]
    return float(pc.mean()) if pc.size else float("nan")


# --------------------------------------------------------------------------------------------
# Paired comparison of two models


@dataclass(frozen=True)
class PairedComparison:
    """Model b against model a on the same n images (accuracies as fractions, not percent).

    diff: acc_b - acc_a. se: its paired standard error, sqrt(var(d_i) / n) with d_i = correct_b -
    correct_a and the sample variance (ddof=1), i.e. the standard error of scipy.stats.ttest_rel;
    nan when n < 2. a_only / b_only: the discordant counts (a right and b wrong / b right and a wrong),
    McNemar's n10 / n01; diff = (b_only - a_only) / n. mcnemar_p: McNemar's exact two-sided p-value
    (binomial test of b_only among the a_only + b_only discordant images, p = 1/2; 1 if none).
    """

    n: int
    acc_a: float
    acc_b: float
    diff: float
    se: float
    a_only: int
    b_only: int
    mcnemar_p: float

    @property
    def discordant(self) -> int:
        """Images on which exactly one model is right."""
        return self.a_only + self.b_only

    @property
    def discordant_fraction(self) -> float:
        return self.discordant / self.n

    @property
    def z(self) -> float:
        """diff / se (nan when se is 0 or undefined)."""
        return self.diff / self.se if self.se > 0 else float("nan")

    def ci95(self) -> tuple[float, float]:
        """Normal-approximation 95% interval of diff: diff -+ 1.96 se."""
        return self.diff - 1.959964 * self.se, self.diff + 1.959964 * self.se


def _correctness(x: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.bool_:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be per-image correctness (booleans or 0/1), got other values")
        a = a.astype(bool)
    return a.ravel()


def paired_accuracy_difference(correct_a: Sequence[bool] | np.ndarray,
                               correct_b: Sequence[bool] | np.ndarray) -> PairedComparison:
    """Compare two models scored on the same test images, in the same order (McNemar-style).

    ``correct_a[i]`` / ``correct_b[i]``: whether model a / b classified image i correctly (booleans or
    0/1). Returns the accuracy difference b - a with its paired standard error
    sqrt(var(d_i) / n), d_i = correct_b[i] - correct_a[i] (sample variance, ddof=1: the standard
    error of the paired t-test), n, the discordant counts and McNemar's exact p-value.

    Only the discordant images move d_i off 0, so se ~ sqrt(discordant fraction / n) when the
    difference is small: a 1-point difference is measured (se ~ 0.5 point) only once n is about
    discordant_fraction / 0.005**2 images (e.g. 6,000 images at a 15% disagreement rate).
    ValueError if the arrays differ in length, are empty, or hold anything but 0/1.
    """
    a = _correctness(correct_a, "correct_a")
    b = _correctness(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a has {a.size} images but correct_b has {b.size}; a paired comparison "
                         "needs both models scored on the same images in the same order")
    n = int(a.size)
    if n == 0:
        raise ValueError("no images to compare")
    a_only = int((a & ~b).sum())
    b_only = int((b & ~a).sum())
    diff = (b_only - a_only) / n
    if n > 1:
        # sum d_i^2 = a_only + b_only (d_i in {-1, 0, 1}); var = (sum d^2 - n mean^2) / (n - 1)
        var = max(0.0, (a_only + b_only - n * diff * diff) / (n - 1))
        se = math.sqrt(var / n)
    else:
        se = float("nan")
    return PairedComparison(n=n, acc_a=float(a.mean()), acc_b=float(b.mean()), diff=diff, se=se,
                            a_only=a_only, b_only=b_only, mcnemar_p=_mcnemar_exact_p(a_only, b_only))


def _mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: 2 P(X <= min) for X ~ Binomial(a_only + b_only, 1/2), capped at 1."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    # Imported here: scipy.stats is slow to import and only this needs it.
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(a_only, b_only), m, 0.5)))


@dataclass(frozen=True)
class SeedDifferences:
    """Per-seed differences b - a (each seed trains both models, e.g. with the same data and init seed).

    mean, std (sample standard deviation, ddof=1) and se = std / sqrt(k) of the k per-seed differences:
    the standard error of scipy.stats.ttest_rel on the per-seed metrics. std and se are nan when k < 2.
    This error includes the training noise (seed-to-seed variation), which the per-image paired
    error of :func:`paired_accuracy_difference` on one seed does not.
    """

    k: int
    mean: float
    std: float
    se: float
    diffs: tuple[float, ...]

    @property
    def t(self) -> float:
        """mean / se: the paired t statistic (k - 1 degrees of freedom); nan when undefined."""
        return self.mean / self.se if self.se > 0 else float("nan")


def paired_seed_differences(metric_a: Sequence[float] | np.ndarray,
                            metric_b: Sequence[float] | np.ndarray) -> SeedDifferences:
    """Differences b - a of a metric (e.g. accuracy) measured per seed, paired by seed (same order).

    ValueError if the sequences differ in length, are empty, or hold non-finite values.
    """
    a = np.asarray(metric_a, dtype=np.float64).ravel()
    b = np.asarray(metric_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"metric_a has {a.size} seeds but metric_b has {b.size}; pair them seed by seed")
    if a.size == 0:
        raise ValueError("no seeds to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-seed metrics must be finite numbers")
    d = b - a
    k = int(d.size)
    std = float(d.std(ddof=1)) if k > 1 else float("nan")
    return SeedDifferences(k=k, mean=float(d.mean()), std=std, se=std / math.sqrt(k) if k > 1 else float("nan"),
                           diffs=tuple(float(x) for x in d))
