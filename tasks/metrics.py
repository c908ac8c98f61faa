"""Classification metrics from a confusion matrix (rows = true class, columns = predicted class).

Mean class accuracy is the mean of the per-class recalls over the classes present in the
evaluated set. A class with no test sample has no accuracy (nan); it is excluded from the mean
rather than counted as 0 or 1, which would bias cross-data-set comparisons (e.g. CK+ subsets).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["accuracy", "confusion_matrix", "mean_class_accuracy", "per_class_accuracy", "support"]


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
