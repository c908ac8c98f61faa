"""JAFFE, as shipped: one folder of ``KA.AN1.39.tiff``-style files (subject, expression + take, number).

Expression codes NE, AN, DI, FE, HA, SA, SU map to the 7 classes. The split is "train" by default
(JAFFE is mostly a cross-data-set test set: pass split=test), or, with folds=N, ``fold-k`` by
subject (sorted subjects, subject i -> fold i % N; folds=10 is leave-one-subject-out).
TIFFs are re-encoded as PNG (lossless) so the image column holds PNG/JPEG only.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import as_int, fold_of, list_images, load_image, require_dir
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.schema import CLASS_INDEX

SOURCE = "jaffe"
JAFFE_CODES = {"NE": "neutral", "AN": "anger", "DI": "disgust", "FE": "fear", "HA": "happy", "SA": "sad",
               "SU": "surprise"}


def _folder(root: str) -> str:
    require_dir(root, "the JAFFE folder")
    if not list_images(root) and os.path.isdir(os.path.join(root, "jaffe")):
        return os.path.join(root, "jaffe")
    return root


@register("jaffe")
def read(root: str, *, split: Any = "train", folds: Any = 0) -> Iterator[Record]:
    """Options: split (split name for every image, default train), folds (N > 0: fold-k by subject instead)."""
    folder = _folder(root)
    folds = as_int(folds, "folds", minimum=0)
    names = list_images(folder)
    if not names:
        raise DatasetFormatError(f"expected JAFFE image files like KA.AN1.39.tiff in {folder}; found none")
    return _records(folder, names, str(split), folds)


def _parse(name: str) -> tuple[str, str] | None:
    parts = os.path.splitext(name)[0].split(".")
    if len(parts) < 2 or not parts[0] or len(parts[1]) < 2:
        return None
    return parts[0], parts[1][:2].upper()


def _records(folder: str, names: list[str], split: str, folds: int) -> Iterator[Record]:
    parsed = {n: _parse(n) for n in names}
    subjects = sorted({p[0] for p in parsed.values() if p is not None})
    subject_fold = {s: fold_of(i, folds) for i, s in enumerate(subjects)} if folds else {}
    for name in names:
        rid = f"{SOURCE}/{os.path.splitext(name)[0]}"
        p = parsed[name]
        if p is None:
            yield Reject(rid, f"bad name: {name} is not SUBJECT.EXPRESSION.NUMBER (e.g. KA.AN1.39.tiff)")
            continue
        subject, code = p
        if code not in JAFFE_CODES:
            yield Reject(rid, f"bad label: expression code {code!r} in {name} is not one of {', '.join(JAFFE_CODES)}")
            continue
        got = load_image(rid, os.path.join(folder, name))
        if isinstance(got, Reject):
            yield got
            continue
        yield dict(id=rid, image=got[0], label=CLASS_INDEX[JAFFE_CODES[code]],
                   split=subject_fold.get(subject, split), source=SOURCE)
