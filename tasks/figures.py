"""Figures shared by the stages: image grids (erased samples, mined samples, distilled images)."""

from __future__ import annotations

import io
import logging
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt
import numpy as np

from tasks.engine.checkpoint import atomic_write_bytes

log = logging.getLogger("fermine.figures")


def draw_safely(what: str, draw: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
    """Call ``draw``; log (do not raise) what went wrong. A figure never fails the stage that computed the data."""
    try:
        return draw(*args, **kwargs)
    except Exception as e:  # any drawing error: the stage's data is what matters
        log.warning("figure %r not drawn: %s: %s", what, type(e).__name__, e)
        return None


def _to_hwc(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 1) if a.max() <= 1.0 else np.clip(a, 0, 255) / 255.0
    return a


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str,
    row_titles: Sequence[str] | None = None,
    cell_titles: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    cell_size: float = 1.3,
) -> str:
    """Save a grid of images (HWC/CHW uint8, or float in [0, 1]) as a PNG at ``path`` (local or any
    fsspec URI, written atomically); returns ``path``."""
    rows = list(rows) or [[np.full((8, 8, 3), 255, np.uint8)]]  # no rows at all: one blank cell
    nrows = len(rows)
    ncols = max(1, max((len(r) for r in rows), default=1))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_size, nrows * cell_size + 0.4), squeeze=False)
    for i in range(nrows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if i < len(rows) and j < len(rows[i]):
                img = _to_hwc(rows[i][j])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
                if cell_titles is not None and i < len(cell_titles) and j < len(cell_titles[i]):
                    ax.set_title(cell_titles[i][j], fontsize=7)
            if j == 0 and row_titles is not None and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
