"""A figure like PASM's Fig. 3: the same training samples with their erased regions, one row per round.

Each round's teacher finds a different sensitive position, so the rows show how the learning
materials change as the teacher improves. The first row (optional) shows the original images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifact import Artifact
from storage.schema import CLASSES
from tasks.data import decode_resized
from tasks.figures import image_grid


def _pick_ids(uri: str, n: int) -> list[str]:
    """Up to n ids, one class after another (round robin over labels) so the figure spans the classes."""
    t = Artifact(uri).read(["id", "label"])
    by_class: dict[int, list[str]] = {}
    for i, lab in zip(t.column("id").to_pylist(), t.column("label").to_pylist()):
        by_class.setdefault(-1 if lab is None else int(lab), []).append(str(i))
    picked: list[str] = []
    queues = [by_class[k] for k in sorted(by_class)]
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    return picked


def _load(uri: str, ids: Sequence[str], size: int | None) -> dict[str, tuple[np.ndarray, int | None]]:
    """Decode the rows with these ids (scanning shard by shard; only the wanted rows are decoded)."""
    art = Artifact(uri)
    want = pa.array(list(ids))
    out: dict[str, tuple[np.ndarray, int | None]] = {}
    for batch in art.iter_batches(columns=["id", "image", "label"], batch_size=1024):
        batch = batch.filter(pc.is_in(batch.column("id"), value_set=want))
        for rid, blob, lab in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(),
                                  batch.column("label").to_pylist()):
            out[str(rid)] = (decode_resized(blob, size) if size else _decode(blob), lab)
    return out


def _decode(blob: bytes) -> np.ndarray:
    from storage.images import decode

    return decode(blob)


def pasm_figure(original_uri: str | None, erased_uris: Sequence[str], path: str, *, n: int = 8,
                ids: Sequence[str] | None = None, row_titles: Sequence[str] | None = None,
                title: str | None = "PASM: new learning materials per round") -> str:
    """Save the grid to ``path`` (PNG): rows = original (unless ``original_uri`` is None), round 1,
    round 2, ...; columns = samples.

    ``ids`` picks the samples (default: up to ``n`` from the first round, spread over the classes).
    Every row shows the same ids; an id missing from a round's table is an error.
    """
    if not erased_uris:
        raise ValueError("pasm_figure needs at least one round's erased table")
    ids = list(ids) if ids is not None else _pick_ids(erased_uris[0], n)
    if not ids:
        raise ValueError(f"{erased_uris[0]} has no rows to show")
    rounds = [_load(u, ids, None) for u in erased_uris]
    size = next(iter(rounds[0].values()))[0].shape[0]
    rows: list[list[np.ndarray]] = []
    cells: list[list[str]] = []
    titles: list[str] = []
    if original_uri is not None:
        orig = _load(original_uri, ids, size)
        rows.append([orig[i][0] for i in ids])
        cells.append([_label_name(orig[i][1]) for i in ids])
        titles.append("original")
    for r, loaded in enumerate(rounds, 1):
        missing = [i for i in ids if i not in loaded]
        if missing:
            raise ValueError(f"round {r} table {erased_uris[r - 1]} lacks ids {missing[:3]}")
        rows.append([loaded[i][0] for i in ids])
        cells.append([_label_name(loaded[i][1]) if original_uri is None and r == 1 else "" for i in ids])
        titles.append(f"round {r}")
    if row_titles is not None:
        titles = list(row_titles)
    return image_grid(rows, path, row_titles=titles, cell_titles=cells, title=title)


def _label_name(lab: int | None) -> str:
    return "" if lab is None else (CLASSES[lab] if 0 <= lab < len(CLASSES) else str(lab))
