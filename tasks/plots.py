"""Figures of a training run: loss/accuracy/lr curves and the confusion matrix (PNG)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["plot_confusion", "plot_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: runs on cluster nodes and in tests
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    import io

    from tasks.engine.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(history: Sequence[dict[str, Any]], path: str, title: str = "training") -> None:
    """Loss, accuracy (train and, when present, validation) and learning rate per epoch."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]

    def col(key: str) -> list[float]:
        return [float("nan") if h.get(key) is None else float(h[key]) for h in history]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, col("loss"), "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        axes[0].plot(ep, col("val_loss"), "s--", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].plot(ep, col("train_acc"), "o-", label="train")
    for key, lab, style in (("val_accuracy", "val", "s--"), ("val_mean_class_accuracy", "val mean class", "^:")):
        if any(h.get(key) is not None for h in history):
            axes[1].plot(ep, col(key), style, label=lab)
    axes[1].set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    axes[2].plot(ep, col("lr"), "o-")
    lrs = [v for v in col("lr") if v > 0 and not math.isnan(v)]
    if lrs and max(lrs) / min(lrs) > 20:
        axes[2].set_yscale("log")
    axes[2].set(title="learning rate", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend(loc="best", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(conf: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], path: str,
                   title: str = "confusion matrix", normalize: bool = True) -> None:
    """Rows = true class, columns = predicted. Cells show the row-normalised rate and the count."""
    plt = _pyplot()
    conf = np.asarray(conf, dtype=np.int64)
    k = conf.shape[0]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for a {k}x{k} confusion matrix")
    rows = conf.sum(axis=1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)
    shown = rate if normalize else conf
    fig, ax = plt.subplots(figsize=(1.0 * k + 2.5, 0.9 * k + 2))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, conf.max()))
    for i in range(k):
        for j in range(k):
            light = shown[i, j] > (0.6 if normalize else 0.6 * conf.max())
            txt = f"{rate[i, j]:.2f}\n({conf[i, j]})" if normalize else str(conf[i, j])
            ax.text(j, i, txt if rows[i, 0] else "-", ha="center", va="center", fontsize=7,
                    color="white" if light else "black")
    ylabels = [f"{c} (n={int(rows[i, 0])})" for i, c in enumerate(classes)]
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), ylabels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)
    plt.close(fig)
