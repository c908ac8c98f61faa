"""What the Progressive Teacher's teachers filtered out: per class (paper's Tables 6-7) and as images (Fig. 9).

Reads the ``filtered/`` table of a run (tasks.pt.method). A sample counts as *filtered out*
when, in the last epoch, every teacher that judged it excluded it from the supervised loss (it was
never learned from at the end of training). When the labeled table carries ``clean_label`` (label
noise injected by tasks.pt.label_noise), the filtered samples are split into synthetic noise and
samples with their original label, as in Table 7.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifact import Artifact, join
from storage.schema import CLASSES
from tasks.engine.checkpoint import atomic_write_bytes, dumps_json
from tasks.data import decode_resized
from tasks.figures import image_grid
from tasks.pt.label_noise import CLEAN_LABEL

__all__ = ["PTReport", "filtered_per_class", "filtered_grid", "format_table", "write_report"]


def _class_name(c: int) -> str:
    return CLASSES[c] if 0 <= c < len(CLASSES) else str(c)


def _ints(col: pa.ChunkedArray) -> np.ndarray:
    return np.array([-1 if v is None else int(v) for v in col.to_pylist()], dtype=np.int64)


def filtered_per_class(filtered_uri: str, num_classes: int = len(CLASSES)) -> list[dict[str, Any]]:
    """One row per class (by the label the sample was trained with) plus a final ``all`` row.

    Keys: class, samples, filtered, filtered_rate; with clean labels also noisy (mislabeled samples carrying
    this label), noisy_filtered, clean_filtered, noisy_filtered_rate, clean_filtered_rate.
    """
    t = Artifact(filtered_uri).read()
    label = _ints(t.column("label"))
    out_mask = np.asarray(t.column("filtered_out").to_pylist(), dtype=bool)
    clean = _ints(t.column(CLEAN_LABEL)) if CLEAN_LABEL in t.schema.names else np.full(len(label), -1)
    has_clean = bool((clean >= 0).any())
    noisy = has_clean & (clean >= 0) & (clean != label)
    k = max(num_classes, int(label.max()) + 1 if len(label) else 0)
    rows: list[dict[str, Any]] = []
    for c in [*range(k), None]:
        sel = np.ones(len(label), bool) if c is None else label == c
        row: dict[str, Any] = {"class": "all" if c is None else _class_name(c), "samples": int(sel.sum()),
                               "filtered": int((sel & out_mask).sum())}
        row["filtered_rate"] = row["filtered"] / row["samples"] if row["samples"] else float("nan")
        if has_clean:
            n_noisy, n_clean = int((sel & noisy).sum()), int((sel & ~noisy).sum())
            row.update({
                "noisy": n_noisy,
                "noisy_filtered": int((sel & noisy & out_mask).sum()),
                "clean_filtered": int((sel & ~noisy & out_mask).sum()),
            })
            row["noisy_filtered_rate"] = row["noisy_filtered"] / n_noisy if n_noisy else float("nan")
            row["clean_filtered_rate"] = row["clean_filtered"] / n_clean if n_clean else float("nan")
        if c is None or row["samples"]:
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, one line per class (the paper's Table 6 layout transposed)."""
    has_clean = "noisy" in rows[0] if rows else False
    head = ["class", "samples", "filtered", "rate"] + (["noisy", "noisy filt.", "clean filt."] if has_clean else [])
    lines = []
    for r in rows:
        cells = [r["class"], str(r["samples"]), str(r["filtered"]), f"{100 * r['filtered_rate']:.1f}%"]
        if has_clean:
            cells += [str(r["noisy"]), f"{r['noisy_filtered']} ({100 * r['noisy_filtered_rate']:.0f}%)"
                      if r["noisy"] else "0", str(r["clean_filtered"])]
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def filtered_grid(filtered_uri: str, labeled_uri: str, path: str, per_class: int = 8, size: int = 64,
                  title: str | None = None) -> str | None:
    """PNG grid: one row per class with filtered samples, the largest last-epoch teacher loss first.

    Cell titles say whether the label was synthetic noise (``noise: true class``). Returns the path,
    or None when nothing was filtered out.
    """
    t = Artifact(filtered_uri).read()
    t = t.filter(t.column("filtered_out"))
    if t.num_rows == 0:
        return None
    label = _ints(t.column("label"))
    clean = _ints(t.column(CLEAN_LABEL)) if CLEAN_LABEL in t.schema.names else np.full(len(label), -1)
    loss = np.nan_to_num(np.asarray(t.column("last_loss").to_pylist(), dtype=np.float64), nan=-1.0)
    ids = t.column("id").to_pylist()
    chosen: dict[int, list[int]] = {}
    for c in sorted(set(label.tolist())):
        idx = np.flatnonzero(label == c)
        chosen[c] = idx[np.argsort(-loss[idx], kind="stable")][:per_class].tolist()
    want = {ids[i] for v in chosen.values() for i in v}
    images: dict[str, np.ndarray] = {}
    art = Artifact(labeled_uri)
    for b in art.iter_batches(columns=["id", "image"], batch_size=512):
        b = b.filter(pc.is_in(b.column("id"), value_set=pa.array(sorted(want), pa.string())))
        for i, data in zip(b.column("id").to_pylist(), b.column("image").to_pylist()):
            images[i] = decode_resized(data, size)
    rows, row_titles, cell_titles = [], [], []
    for c, idx in chosen.items():
        idx = [i for i in idx if ids[i] in images]
        if not idx:
            continue
        rows.append([images[ids[i]] for i in idx])
        n = int((label == c).sum())
        row_titles.append(f"{_class_name(c)} ({n})")
        cell_titles.append([(f"noise: {_class_name(int(clean[i]))}" if 0 <= clean[i] != c else
                             ("clean" if clean[i] >= 0 else "")) + f"\nloss {loss[i]:.2f}" for i in idx])
    if not rows:
        return None
    return image_grid(rows, path, row_titles=row_titles, cell_titles=cell_titles,
                      title=title or "samples filtered out by the teachers (label = row)")


@dataclass
class PTReport:
    rows: list[dict[str, Any]]
    table: str
    csv_uri: str
    json_uri: str
    png_uri: str | None


def write_report(run_uri: str, labeled_uri: str, out_uri: str | None = None, per_class: int = 8,
                 size: int = 64) -> PTReport:
    """Write ``filtered_per_class.csv``/``.json`` and ``filtered.png`` for a PT run (default: into the run)."""
    out_uri = (out_uri or run_uri).rstrip("/")
    filtered_uri = join(run_uri, "filtered")
    rows = filtered_per_class(filtered_uri)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    csv_uri, json_uri, png_uri = (join(out_uri, n) for n in ("filtered_per_class.csv", "filtered_per_class.json",
                                                             "filtered.png"))
    atomic_write_bytes(csv_uri, buf.getvalue().encode())
    atomic_write_bytes(json_uri, dumps_json(rows).encode())
    png = filtered_grid(filtered_uri, labeled_uri, png_uri, per_class, size)
    return PTReport(rows=rows, table=format_table(rows), csv_uri=csv_uri, json_uri=json_uri, png_uri=png)
