"""Valence/arousal regression metrics (RMSE, SAGR, PCC, CCC) and their differentiable losses.

Definitions follow the CAF paper (contrastive_adversarial_av.md, "Evaluation metrics"):

- RMSE(y, yhat) = sqrt(E (y - yhat)^2)
- SAGR(y, yhat) = mean(sign(y) == sign(yhat))        (Kronecker delta on the signs; sign(0) = 0)
- PCC = cov(y, yhat) / (sigma_y sigma_yhat)
- CCC = 2 cov(y, yhat) / (sigma_y^2 + sigma_yhat^2 + (mu_y - mu_yhat)^2)
      = 2 sigma_y sigma_yhat PCC / (...), written with the covariance so that a constant
        prediction gives CCC = 0 instead of 0 * nan.

Population (biased, ddof=0) moments throughout: PCC does not depend on the choice, CCC does a
little, and ddof=0 is the usual choice for CCC (Lin 1989) and what the paper's formula implies.
PCC of a constant vector is undefined: the numpy metric returns nan (as scipy.stats.pearsonr does),
the loss uses a small epsilon so training never sees nan.

Column order everywhere in fermine: 0 = valence, 1 = arousal.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

__all__ = [
    "VA_METRICS",
    "ccc",
    "ccc_loss",
    "format_row",
    "pcc",
    "pcc_loss",
    "rmse",
    "rmse_loss",
    "sagr",
    "va_loss",
    "va_metrics",
]

# The 8 numbers of the paper's tables, in table order.
VA_METRICS: tuple[str, ...] = ("rmse_v", "rmse_a", "sagr_v", "sagr_a", "pcc_v", "pcc_a", "ccc_v", "ccc_a")


def _pair(y, yhat) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    yhat = np.asarray(yhat, dtype=np.float64).ravel()
    if y.shape != yhat.shape:
        raise ValueError(f"labels and predictions differ in length: {y.size} vs {yhat.size}")
    if y.size == 0:
        raise ValueError("cannot compute a metric on zero samples")
    return y, yhat


# ---------------------------------------------------------------- numpy metrics (evaluation)


def rmse(y, yhat) -> float:
    y, yhat = _pair(y, yhat)
    return float(np.sqrt(np.mean((y - yhat) ** 2)))


def sagr(y, yhat) -> float:
    y, yhat = _pair(y, yhat)
    return float(np.mean(np.sign(y) == np.sign(yhat)))


def pcc(y, yhat) -> float:
    y, yhat = _pair(y, yhat)
    dy, dp = y - y.mean(), yhat - yhat.mean()
    denom = np.sqrt(np.sum(dy * dy) * np.sum(dp * dp))
    if denom == 0.0:
        return float("nan")  # a constant vector has no correlation (scipy returns nan too)
    return float(np.sum(dy * dp) / denom)


def ccc(y, yhat) -> float:
    y, yhat = _pair(y, yhat)
    my, mp = y.mean(), yhat.mean()
    cov = np.mean((y - my) * (yhat - mp))
    denom = y.var() + yhat.var() + (my - mp) ** 2
    if denom == 0.0:
        return float("nan")  # both constant and equal: agreement is undefined
    return float(2.0 * cov / denom)


def va_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The 8 table metrics for (N, 2) arrays of (valence, arousal): keys :data:`VA_METRICS`."""
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if true.ndim != 2 or true.shape[1] != 2 or true.shape != pred.shape:
        raise ValueError(f"expected (N, 2) valence/arousal arrays, got {true.shape} and {pred.shape}")
    out: dict[str, float] = {}
    for name, fn in (("rmse", rmse), ("sagr", sagr), ("pcc", pcc), ("ccc", ccc)):
        out[f"{name}_v"] = fn(true[:, 0], pred[:, 0])
        out[f"{name}_a"] = fn(true[:, 1], pred[:, 1])
    return {k: out[k] for k in VA_METRICS}


def format_row(m: Mapping[str, float], digits: int = 4) -> list[str]:
    """The 8 metrics as strings in table order ("nan" stays visible, never hidden)."""
    return [f"{m[k]:.{digits}f}" for k in VA_METRICS]


# ---------------------------------------------------------------- torch losses (training)

_EPS = 1e-8


def rmse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over output columns of the per-column RMSE ((N,) or (N, C) tensors)."""
    if pred.dim() == 1:
        pred, target = pred[:, None], target[:, None]
    # eps inside the sqrt: d sqrt(x)/dx is infinite at 0 (a perfect batch would give nan gradients).
    return torch.sqrt(((pred - target) ** 2).mean(dim=0) + _EPS).mean()


def _moments(pred: torch.Tensor, target: torch.Tensor):
    if pred.dim() == 1:
        pred, target = pred[:, None], target[:, None]
    mp, mt = pred.mean(dim=0), target.mean(dim=0)
    dp, dt = pred - mp, target - mt
    cov = (dp * dt).mean(dim=0)
    vp, vt = (dp * dp).mean(dim=0), (dt * dt).mean(dim=0)
    return mp, mt, cov, vp, vt


def pcc_per_column(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _, _, cov, vp, vt = _moments(pred, target)
    return cov / torch.sqrt(vp * vt + _EPS)


def ccc_per_column(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mp, mt, cov, vp, vt = _moments(pred, target)
    return 2.0 * cov / (vp + vt + (mp - mt) ** 2 + _EPS)


def pcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_PCC = 1 - mean over columns of PCC (paper: 1 - (PCC_a + PCC_v) / 2)."""
    return 1.0 - pcc_per_column(pred, target).mean()


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_CCC = 1 - mean over columns of CCC (paper: 1 - (CCC_a + CCC_v) / 2)."""
    return 1.0 - ccc_per_column(pred, target).mean()


def va_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 0.5) -> torch.Tensor:
    """L_AV = L_RMSE + eps (L_PCC + L_CCC), eps = 0.5 in the paper; (N, 2) tensors."""
    return rmse_loss(pred, target) + eps * (pcc_loss(pred, target) + ccc_loss(pred, target))
