"""A grid like the Omni-supervised paper's Fig. 3: mined faces, one row per pseudo class, by confidence.

Confidence is the best cosine similarity to a centroid (Eq. 5), the quantity the paper sorts Fig. 3 by.
``mode="top"`` shows the most confident faces of each class; ``mode="spread"`` (default) shows faces at
evenly spaced ranks from the most to the least confident one kept, so the row also shows what the
margin let in at the bottom. Two streaming passes over the auxiliary table (scores, then the chosen
images), so only the scores of the kept rows are ever in memory, never the images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifact import Artifact
from storage.schema import CLASSES


def pick(sims: np.ndarray, per_class: int, mode: str) -> np.ndarray:
    """Indices into ``sims`` to show, most confident first."""
    order = np.argsort(-sims, kind="stable")
    if mode == "top" or len(order) <= per_class:
        return order[:per_class]
    if mode != "spread":
        raise ValueError(f"mode must be 'top' or 'spread', got {mode!r}")
    ranks = np.unique(np.round(np.linspace(0, len(order) - 1, per_class)).astype(int))
    return order[ranks]


def mined_grid(aux_uri: str, out_path: str, per_class: int = 8, mode: str = "spread", size: int = 64,
               title: str | None = None) -> dict[str, Any]:
    """Write the grid PNG to ``out_path`` (local path or fsspec URI); returns what it shows per class."""
    from tasks.data import decode_resized

    if per_class < 1:
        raise ValueError("per_class must be >= 1")
    art = Artifact(aux_uri)
    missing = {"id", "label", "best_similarity"} - set(art.schema.names)
    if missing:
        raise ValueError(f"{aux_uri} is not an auxiliary samples table (no {', '.join(sorted(missing))}); "
                         "make one with `fermine mine`")
    ids: dict[int, list[str]] = {}
    sims: dict[int, list[float]] = {}
    for b in art.iter_batches(columns=["id", "label", "best_similarity"], batch_size=8192):
        for i, y, s in zip(b.column("id").to_pylist(), b.column("label").to_pylist(),
                           b.column("best_similarity").to_pylist()):
            if y is None:
                continue
            ids.setdefault(int(y), []).append(i)
            sims.setdefault(int(y), []).append(float(s))
    chosen: dict[int, list[tuple[str, float]]] = {}
    for k in sorted(ids):
        s = np.asarray(sims[k])
        chosen[k] = [(ids[k][j], float(s[j])) for j in pick(s, per_class, mode)]
    want = {i for v in chosen.values() for i, _ in v}
    images: dict[str, np.ndarray] = {}
    if want:
        value_set = pa.array(sorted(want))
        for b in art.iter_batches(columns=["id", "image"], batch_size=1024):
            b = b.filter(pc.is_in(b.column("id"), value_set=value_set))
            for i, data in zip(b.column("id").to_pylist(), b.column("image").to_pylist()):
                images[i] = decode_resized(data, size)
    classes = sorted(chosen)
    names = [CLASSES[k] if k < len(CLASSES) else str(k) for k in classes]
    rows = [[images[i] for i, _ in chosen[k]] for k in classes]
    cells = [[f"{s:.3f}" for _, s in chosen[k]] for k in classes]
    row_titles = [f"{n}\n({len(ids[k])})" for n, k in zip(names, classes)]
    title = title or f"mined samples by confidence ({'most confident' if mode == 'top' else 'rank spread'}, " \
                     f"{sum(len(v) for v in ids.values())} kept)"
    save_grid(rows, out_path, row_titles=row_titles, cell_titles=cells, title=title)
    return {n: [{"id": i, "similarity": s} for i, s in chosen[k]] for n, k in zip(names, classes)}


def save_grid(rows, uri: str, **kw: Any) -> str:
    """tasks.figures.image_grid, with a placeholder cell when nothing was mined."""
    from tasks.figures import image_grid

    if not rows:
        rows = [[np.zeros((8, 8, 3), np.uint8)]]
        kw["title"] = (kw.get("title") or "") + " (nothing mined)"
    return image_grid(rows, uri, **kw)
