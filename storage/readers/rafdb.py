"""RAF-DB basic, as shipped: ``basic/EmoLabel/list_patition_label.txt`` + ``basic/Image/{aligned,original}``.

The label list has one ``train_00001.jpg 5`` line per image, RAF-DB's codes being 1 surprise,
2 fear, 3 disgust, 4 happiness, 5 sadness, 6 anger, 7 neutral; the split is the file name's prefix.
The manual 5-point landmarks (``Annotation/manual/<name>_manu_attri.txt``, first 5 lines "x y")
are in original-image pixels, so they are attached only when reading the original images.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import as_bool, load_image, require_dir, require_file
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.schema import CLASS_INDEX

SOURCE = "rafdb"
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")  # sic: the publisher's spelling
RAF_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral"}
RAF_TO_CLASS = {code: CLASS_INDEX[name] for code, name in RAF_CODES.items()}


def _base(root: str) -> str:
    # Accept the folder that holds EmoLabel/ or the one above it (the archive unpacks to basic/).
    for cand in (root, os.path.join(root, "basic")):
        if os.path.isfile(os.path.join(cand, LABEL_FILE)):
            return cand
    require_dir(root, "the RAF-DB 'basic' folder")
    raise DatasetFormatError(
        f"expected the RAF-DB label list {LABEL_FILE} under {root} (or {os.path.join(root, 'basic')}); "
        "point ROOT at RAF-DB's 'basic' folder"
    )


def _landmarks(path: str) -> list[float]:
    with open(path) as f:
        lines = [ln.split() for ln in f.read().splitlines()[:5]]
    if len(lines) < 5 or any(len(ln) < 2 for ln in lines):
        raise ValueError("fewer than 5 'x y' lines")
    return [float(v) for ln in lines for v in ln[:2]]


@register("rafdb")
def read(root: str, *, aligned: Any = True, landmarks: Any = True) -> Iterator[Record]:
    """Options: aligned (use Image/aligned, default true; false reads Image/original),
    landmarks (attach manual 5-point landmarks when reading original images, default true)."""
    base = _base(root)
    aligned = as_bool(aligned, "aligned")
    use_lm = as_bool(landmarks, "landmarks") and not aligned
    img_dir = require_dir(os.path.join(base, "Image", "aligned" if aligned else "original"),
                          f"RAF-DB's Image/{'aligned' if aligned else 'original'} folder")
    labels = require_file(os.path.join(base, LABEL_FILE), "the RAF-DB label list")
    lm_dir = os.path.join(base, "Annotation", "manual")
    return _records(labels, img_dir, aligned, lm_dir if use_lm and os.path.isdir(lm_dir) else None)


def _records(labels: str, img_dir: str, aligned: bool, lm_dir: str | None) -> Iterator[Record]:
    seen: set[str] = set()
    with open(labels) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            name = parts[0]
            stem = os.path.splitext(name)[0]
            rid = f"{SOURCE}/{stem}"
            if len(parts) != 2:
                yield Reject(rid, f"bad line: line {lineno} of the label list is not 'NAME LABEL': {line.strip()!r}")
                continue
            if rid in seen:
                yield Reject(rid, f"duplicate: {name} is listed twice (line {lineno})")
                continue
            seen.add(rid)
            split = stem.split("_", 1)[0]
            if split not in ("train", "test"):
                yield Reject(rid, f"bad name: {name} does not start with train_ or test_")
                continue
            try:
                code = int(parts[1])
                label = RAF_TO_CLASS[code]
            except (ValueError, KeyError):
                yield Reject(rid, f"bad label: {parts[1]!r} is not a RAF-DB code 1..7")
                continue
            fname = f"{stem}_aligned.jpg" if aligned else name
            got = load_image(rid, os.path.join(img_dir, fname))
            if isinstance(got, Reject):
                yield got
                continue
            data, _ = got
            lm = None
            if lm_dir is not None:
                lm_path = os.path.join(lm_dir, f"{stem}_manu_attri.txt")
                if os.path.isfile(lm_path):
                    try:
                        lm = _landmarks(lm_path)
                    except (OSError, ValueError) as e:
                        yield Reject(rid, f"bad landmarks: {lm_path}: {e}")
                        continue
            yield dict(id=rid, image=data, label=label, split=split, source=SOURCE, landmarks=lm)
