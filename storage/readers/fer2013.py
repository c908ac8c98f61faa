"""FER2013, as shipped by the Kaggle challenge: ``fer2013.csv`` with columns emotion, pixels, Usage.

``pixels`` is 2304 space-separated gray values (48x48); ``emotion`` counts 0 angry, 1 disgust,
2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral; ``Usage`` Training / PublicTest / PrivateTest
becomes train / val / test. Images are stored as gray PNGs (decode gives RGB). Row ``i`` (0-based,
header excluded) gets id ``fer2013/{i:05d}``: FERPlus names the same row ``fer{i:07d}.png``.
"""

from __future__ import annotations

import csv
import os
from typing import Iterator

import numpy as np

from storage.images import encode
from storage.readers import register
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.schema import CLASS_INDEX

SOURCE = "fer2013"
SIZE = 48
FER_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}
FER_TO_CLASS = {code: CLASS_INDEX[name] for code, name in FER_CODES.items()}
USAGE_TO_SPLIT = {"training": "train", "publictest": "val", "privatetest": "test"}


def find_csv(root: str, name: str = "fer2013.csv") -> str:
    """ROOT may be the csv itself, its folder, or the folder the Kaggle tarball unpacks into."""
    if os.path.isfile(root):
        return root
    for cand in (os.path.join(root, name), os.path.join(root, "fer2013", name)):
        if os.path.isfile(cand):
            return cand
    raise DatasetFormatError(f"expected {name} at {root} (or {os.path.join(root, 'fer2013', name)}); "
                             "point ROOT at the csv or the folder that holds it")


def csv_columns(path: str, required: tuple[str, ...]) -> dict[str, int]:
    """Column name -> index from the csv header, checked eagerly (before any output is written).

    Some redistributions pad header names with spaces (" Usage", " pixels"); names are stripped.
    """
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise DatasetFormatError(f"{path} is empty; expected a header with columns {', '.join(required)}")
    cols = {h.strip(): i for i, h in enumerate(header)}
    missing = [c for c in required if c not in cols]
    if missing:
        raise DatasetFormatError(
            f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(required)}, found {', '.join(cols)}"
        )
    return cols


def csv_rows(path: str) -> Iterator[list[str]]:
    """The data rows of a csv file (header skipped), streamed."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        yield from reader


def parse_pixels(text: str) -> np.ndarray:
    """48x48 uint8 gray image from the pixels string; ValueError says what is wrong."""
    try:
        vals = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise ValueError("pixels contain a non-integer value") from None
    if vals.size != SIZE * SIZE:
        raise ValueError(f"pixels hold {vals.size} values, expected {SIZE * SIZE} (48x48)")
    if vals.min() < 0 or vals.max() > 255:
        raise ValueError("pixel values outside 0..255")
    return vals.astype(np.uint8).reshape(SIZE, SIZE)


def pixels_png(rid: str, text: str) -> bytes | Reject:
    try:
        return encode(parse_pixels(text), ".png")
    except ValueError as e:
        return Reject(rid, f"corrupt: {e}")


def usage_split(usage: str) -> str | None:
    return USAGE_TO_SPLIT.get(usage.strip().lower())


@register("fer2013")
def read(root: str) -> Iterator[Record]:
    """ROOT: fer2013.csv or the folder holding it. No options."""
    path = find_csv(root)
    return _records(path, csv_columns(path, ("emotion", "pixels", "Usage")))


def _records(path: str, cols: dict[str, int]) -> Iterator[Record]:
    ie, ip, iu = cols["emotion"], cols["pixels"], cols["Usage"]
    width = max(ie, ip, iu) + 1
    for i, row in enumerate(csv_rows(path)):
        rid = f"{SOURCE}/{i:05d}"
        if len(row) < width:
            yield Reject(rid, f"bad line: {len(row)} fields, expected at least {width}")
            continue
        split = usage_split(row[iu])
        if split is None:
            yield Reject(rid, f"bad split: Usage {row[iu]!r} is not Training, PublicTest or PrivateTest")
            continue
        try:
            label = FER_TO_CLASS[int(row[ie].strip())]
        except (ValueError, KeyError):
            yield Reject(rid, f"bad label: emotion {row[ie]!r} is not a FER2013 code 0..6")
            continue
        png = pixels_png(rid, row[ip])
        if isinstance(png, Reject):
            yield png
            continue
        yield dict(id=rid, image=png, label=label, split=split, source=SOURCE)
