"""The one definition of synthetic label noise (Progressive Teacher paper, Section 4.3.2).

It lives in ``storage`` so that both the synthetic generator (storage/synthetic.py, which may
corrupt its own training labels) and the noise-injection stage (tasks/pt/label_noise.py, which
corrupts any image table) draw noise the same way; ``tasks`` may import ``storage`` but not the
reverse.

* ``symmetric``: in every class c, ``round(rate * n_c)`` samples chosen at random are relabelled
  uniformly to one of the other classes.
* ``asymmetric``: ``round(rate * n_c)`` samples of ``fear`` become ``surprise`` and as many of
  ``surprise`` become ``fear``; no other class is touched.

The random draws are, in order, per affected class: ``rng.choice(idx, k, replace=False)`` then (for
symmetric) ``rng.integers(0, C - 1, k)`` mapped to the other classes, which is what the generator
has always done, so a seeded generator reproduces the same labels through this function.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from storage.schema import CLASS_INDEX, NUM_CLASSES

NOISE_KINDS: tuple[str, ...] = ("symmetric", "asymmetric")
ASYMMETRIC_PAIRS: tuple[tuple[int, int], ...] = ((CLASS_INDEX["fear"], CLASS_INDEX["surprise"]),)


def check_noise(kind: str, rate: float) -> None:
    """ValueError with the valid choices for a bad kind or rate."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown label-noise kind {kind!r}; choose one of: {', '.join(NOISE_KINDS)}")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"label-noise rate must be a fraction in [0, 1] (0.3 = 30%), got {rate}")


def n_to_flip(rate: float, n: int) -> int:
    """Samples of a class of size ``n`` that are relabelled: Python's ``round(rate * n)``."""
    return min(int(n), int(round(float(rate) * int(n))))


def corrupt_labels(labels: np.ndarray | Sequence[int], kind: str, rate: float, rng: np.random.Generator,
                   num_classes: int = NUM_CLASSES,
                   pairs: Sequence[tuple[int, int]] = ASYMMETRIC_PAIRS) -> np.ndarray:
    """Noisy copy of ``labels`` (entries < 0, i.e. unlabeled, are never touched)."""
    check_noise(kind, rate)
    clean = np.asarray(labels, dtype=np.int64)
    out = clean.copy()
    if rate == 0:
        return out
    if kind == "symmetric":
        if num_classes < 2:
            raise ValueError("symmetric label noise needs at least 2 classes")
        for c in range(num_classes):
            idx = np.flatnonzero(clean == c)
            flip = rng.choice(idx, n_to_flip(rate, len(idx)), replace=False)
            # Uniform over the other C - 1 classes: draw 0..C-2 and step over c.
            new = rng.integers(0, num_classes - 1, len(flip))
            out[flip] = new + (new >= c)
        return out
    for a, b in pairs:
        for src, dst in ((a, b), (b, a)):
            idx = np.flatnonzero(clean == src)
            out[rng.choice(idx, n_to_flip(rate, len(idx)), replace=False)] = dst
    return out


__all__ = ["ASYMMETRIC_PAIRS", "NOISE_KINDS", "check_noise", "corrupt_labels", "n_to_flip"]
