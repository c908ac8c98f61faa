"""AffectNet (manually annotated part), as shipped: ``training.csv`` / ``validation.csv`` + images.

Columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks (68 points
as "x;y;x;y;..."), expression (0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger,
7 contempt, 8 none, 9 uncertain, 10 no-face), valence, arousal (in [-1, 1]; -2 = not annotated).
Images live under ``Manually_Annotated_Images/<subDirectory_filePath>``.

AffectNet's own test set is not released; papers (and fermine) use the validation set as the test
set, so validation.csv becomes split "test" unless the ``validation_split`` option says otherwise.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Iterator

import numpy as np

from storage.images import encode
from storage.readers import register
from storage.readers._common import as_bool, as_float, five_from_68, load_image, one_of
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.schema import CLASS_INDEX

SOURCE = "affectnet"
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
           "expression", "valence", "arousal")
AFFECTNET_CODES = {0: "neutral", 1: "happy", 2: "sad", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger"}
AFFECTNET_TO_CLASS = {code: CLASS_INDEX[name] for code, name in AFFECTNET_CODES.items()}
NOT_BASIC = {7: "contempt", 8: "none", 9: "uncertain", 10: "no-face"}
LIST_DIRS = ("", "Manually_Annotated_file_lists")
IMAGE_DIRS = ("Manually_Annotated_Images", os.path.join("Manually_Annotated", "Manually_Annotated_Images"))


def _find(root: str, names: tuple[str, ...], kind: str) -> str:
    for sub in names:
        cand = os.path.join(root, sub)
        if (os.path.isdir(cand) if kind == "dir" else os.path.isfile(cand)):
            return cand
    return ""


@register("affectnet")
def read(root: str, *, subset: Any = "all", crop: Any = True, margin: Any = 0.0, keep_va_only: Any = False,
         validation_split: Any = "test") -> Iterator[Record]:
    """Options: subset (all | training | validation), crop (crop to the annotated face box and
    re-encode as JPEG, default true), margin (extra border around the box as a fraction of its size),
    keep_va_only (keep contempt / none / uncertain faces unlabeled but with valence/arousal, for
    valence-arousal regression), validation_split (split name for validation.csv, default test)."""
    if not os.path.isdir(root):
        raise DatasetFormatError(f"expected the AffectNet folder at {root}, but it is not a folder")
    subset = one_of(subset, "subset", ("all", "training", "validation"))
    crop, keep_va_only = as_bool(crop, "crop"), as_bool(keep_va_only, "keep_va_only")
    margin = as_float(margin, "margin")
    if margin < 0:
        raise ValueError(f"option margin must be >= 0, got {margin}")
    wanted = [("training", "train"), ("validation", str(validation_split))]
    wanted = [w for w in wanted if subset in ("all", w[0])]
    lists = [(_find(root, tuple(os.path.join(d, f"{name}.csv") for d in LIST_DIRS), "file"), split)
             for name, split in wanted]
    if not any(p for p, _ in lists):
        raise DatasetFormatError(
            f"expected AffectNet's {' / '.join(n + '.csv' for n, _ in wanted)} in {root} or "
            f"{os.path.join(root, 'Manually_Annotated_file_lists')}"
        )
    if subset != "all" and not lists[0][0]:
        raise DatasetFormatError(f"expected {subset}.csv in {root} or its Manually_Annotated_file_lists folder")
    images = _find(root, IMAGE_DIRS, "dir")
    if not images:
        raise DatasetFormatError(f"expected AffectNet's images in {os.path.join(root, IMAGE_DIRS[0])}")
    for path, _ in lists:
        if path:
            _check_header(path)
    return _records([(p, s) for p, s in lists if p], images, crop, margin, keep_va_only)


def _check_header(path: str) -> None:
    with open(path, newline="") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DatasetFormatError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")


def _va(text: str) -> float | None:
    v = float(text)
    if v == -2:  # AffectNet's marker for "not annotated"
        return None
    if not -1.0 <= v <= 1.0:
        raise ValueError(f"{v} is outside [-1, 1]")
    return v


def _records(lists, images: str, crop: bool, margin: float, keep_va_only: bool) -> Iterator[Record]:
    for path, split in lists:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            for row in reader:
                yield _record(row, images, split, crop, margin, keep_va_only)


def _record(row: dict, images: str, split: str, crop: bool, margin: float, keep_va_only: bool) -> Record:
    rel = (row.get("subDirectory_filePath") or "").strip()
    rid = f"{SOURCE}/{os.path.splitext(rel)[0]}"
    if not rel:
        return Reject(f"{SOURCE}/?", "bad line: empty subDirectory_filePath")
    try:
        code = int(float(row["expression"]))
    except (TypeError, ValueError):
        return Reject(rid, f"bad label: expression {row.get('expression')!r} is not an AffectNet code 0..10")
    try:
        valence, arousal = _va(row["valence"]), _va(row["arousal"])
    except (TypeError, ValueError) as e:
        return Reject(rid, f"bad label: valence/arousal {row.get('valence')!r}, {row.get('arousal')!r}: {e}")
    if code in AFFECTNET_TO_CLASS:
        label: int | None = AFFECTNET_TO_CLASS[code]
    elif code in NOT_BASIC:
        usable = keep_va_only and code != 10 and valence is not None and arousal is not None
        if not usable:
            return Reject(rid, f"{NOT_BASIC[code]}: not a basic expression (expression {code})")
        label = None
    else:
        return Reject(rid, f"bad label: expression {code} is not an AffectNet code 0..10")
    got = load_image(rid, os.path.join(images, rel))
    if isinstance(got, Reject):
        return got
    data, rgb = got
    lm_text = (row.get("facial_landmarks") or "").strip()
    lm = None
    if lm_text:
        try:
            lm = np.array(five_from_68([float(v) for v in lm_text.split(";") if v.strip()])).reshape(5, 2)
        except ValueError as e:
            return Reject(rid, f"bad landmarks: {e}")
    if crop:
        try:
            x, y, w, h = (int(float(row[k])) for k in ("face_x", "face_y", "face_width", "face_height"))
        except (TypeError, ValueError):
            return Reject(rid, "bad face box: face_x/face_y/face_width/face_height are not numbers")
        mx, my = int(round(w * margin)), int(round(h * margin))
        H, W = rgb.shape[:2]
        x0, y0, x1, y1 = max(0, x - mx), max(0, y - my), min(W, x + w + mx), min(H, y + h + my)
        if w <= 0 or h <= 0 or x1 - x0 < 2 or y1 - y0 < 2:
            return Reject(rid, f"bad face box: ({x}, {y}, {w}, {h}) is empty or outside the {W}x{H} image")
        data = encode(rgb[y0:y1, x0:x1], ".jpg", quality=95)
        if lm is not None:
            lm = lm - np.array([x0, y0], dtype=np.float64)
    return dict(id=rid, image=data, label=label, split=split, source=SOURCE, valence=valence, arousal=arousal,
                landmarks=None if lm is None else lm.reshape(-1).tolist())
