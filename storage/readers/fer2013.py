"""FER2013, as shipped by the Kaggle challenge: ``fer2013.csv`` with columns emotion, pixels, Usage.

``pixels`` is 2304 space-separated gray values (48x48); ``emotion`` counts 0 angry, 1 disgust,
2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral; ``Usage`` Training / PublicTest / PrivateTest
becomes train / val / test. Images are stored as gray PNGs (decode gives RGB). Row ``i`` (0-based,
header excluded) gets id ``fer2013/{i:05d}``: FERPlus names the same row ``fer{i:07d}.png``.
Splittable: ``entries`` records where each row starts in the file, a slice is parsed from there.
"""

from __future__ import annotations

import csv
import os
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from storage.images import encode
from storage.readers import register, register_splittable
from storage.readers.base import DatasetFormatError, Entries, Record, Reject
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
    cols = csv_columns(path, ("emotion", "pixels", "Usage"))
    return _records(cols, ((i, row) for i, (_, row) in enumerate(_rows_from(path, 0, header=True))))


def entries(root: str) -> Entries:
    """The byte offset at which each data row starts (one csv pass), so a slice is read from its first
    row on instead of parsing every row before it."""
    path = find_csv(root)
    cols = csv_columns(path, ("emotion", "pixels", "Usage"))
    starts = np.fromiter((start for start, _ in _rows_from(path, 0, header=True)), dtype=np.int64)
    return Entries({"row": np.arange(len(starts), dtype=np.int64), "start": starts}, {"path": path, "cols": cols})


def read_entries(part: Entries) -> Iterator[Record]:
    return _records(part.context["cols"], _slice_rows(part.context["path"], part))


register_splittable("fer2013", entries, read_entries)


class _Lines:
    """The decoded lines of a binary file from ``offset`` on, counting the bytes consumed: csv.reader
    pulls one line at a time, so ``pos`` before each row is where that row starts.

    Lines end at \n, \r\n or a lone \r, as in text mode with newline="" (what csv expects).
    """

    def __init__(self, f: BinaryIO, offset: int):
        self.f, self.pos = f, offset
        f.seek(offset)

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            for piece in raw.splitlines(keepends=True):
                self.pos += len(piece)
                yield piece.decode("utf-8")


def _rows_from(path: str, offset: int, header: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(start offset, fields) of each csv row from byte ``offset`` on; ``header`` skips the first row."""
    with open(path, "rb") as f:
        lines = _Lines(f, offset)
        reader = csv.reader(lines)
        if header:
            next(reader, None)
        while True:
            start = lines.pos
            row = next(reader, None)
            if row is None:
                return
            yield start, row


def _slice_rows(path: str, part: Entries) -> Iterator[tuple[int, list[str]]]:
    """(row index, fields) of the consecutive rows of ``part``, read from its first row's offset on."""
    rows, starts = part.columns["row"].tolist(), part.columns["start"].tolist()
    if not rows:
        return
    got = _rows_from(path, starts[0])
    try:
        for i, want in zip(rows, starts):
            start, row = next(got, (None, None))
            if start != want:  # rows moved: the file was changed after its rows were listed
                raise DatasetFormatError(f"{path} changed while it was being ingested (row {i} is no longer at "
                                         f"byte {want}); ingest it again from the start into a new output")
            yield i, row
    finally:
        got.close()  # the rows after the slice are not read: close the file now


def _records(cols: dict[str, int], rows: Iterable[tuple[int, list[str]]]) -> Iterator[Record]:
    ie, ip, iu = cols["emotion"], cols["pixels"], cols["Usage"]
    width = max(ie, ip, iu) + 1
    for i, row in rows:
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
