"""What every data set reader yields: image rows, or rejects that say why an entry was skipped.

A reader whose source has random access can also list its **entries** (storage.readers.Splittable):
what it reads, in order, as compact columns that slice cheaply, so the parts of one source can be
read by different processes and, concatenated in order, give exactly the records of the plain reader.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union, overload

import numpy as np


@dataclass(frozen=True)
class Reject:
    id: str
    reason: str


# A record is an image-table row (see storage.schema.image_row) or a Reject.
Record = Union[dict[str, Any], Reject]
Reader = Callable[..., Iterator[Record]]


class DatasetFormatError(ValueError):
    """The data set on disk is not laid out as its publisher ships it; the message says what is missing."""


class PackedStrings(Sequence[str]):
    """Many strings as one UTF-8 byte array plus offsets: ~1 byte per character instead of a
    Python object each (5.8M file paths fit in ~150 MB, not ~600 MB), and slices that pickle small."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob = blob  # uint8
        self.offsets = offsets  # int64, len(self) + 1, offsets[0] == 0

    @classmethod
    def from_iter(cls, strings: Iterable[str]) -> PackedStrings:
        blob, offsets = bytearray(), array("q", [0])
        for s in strings:
            blob += s.encode("utf-8", "surrogateescape")  # file names need not be valid UTF-8
            offsets.append(len(blob))
        return cls(np.frombuffer(bytes(blob), dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64).copy())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> PackedStrings: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                raise ValueError("PackedStrings slices must be contiguous (step 1)")
            b = max(a, b)
            lo, hi = int(self.offsets[a]), int(self.offsets[b])
            return PackedStrings(self.blob[lo:hi].copy(), self.offsets[a:b + 1] - lo)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        data, off = self.blob.tobytes(), self.offsets.tolist()
        for a, b in itertools.pairwise(off):
            yield data[a:b].decode("utf-8", "surrogateescape")

    def hash_into(self, h: Any) -> None:
        h.update(memoryview(np.ascontiguousarray(self.offsets)))
        h.update(memoryview(np.ascontiguousarray(self.blob)))


Column = np.ndarray | PackedStrings


@dataclass(frozen=True)
class Entries:
    """A source's entries in the order its reader reads them: equal-length ``columns`` (1-D numpy
    arrays or PackedStrings) plus the ``context`` every entry shares (paths, settings, small tables).

    ``entries[a:b]`` is entries a..b-1 with the same context, copied, so a slice handed to another
    process carries only its own entries.
    """

    columns: Mapping[str, Column]
    context: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"entry columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, s: slice) -> Entries:
        if not isinstance(s, slice):
            raise TypeError("Entries are sliced (entries[a:b]), not indexed")
        cols = {name: col[s].copy() if isinstance(col, np.ndarray) else col[s] for name, col in self.columns.items()}
        return Entries(cols, self.context)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """One tuple per entry, the columns' values as Python objects, in column order."""
        return zip(*(col.tolist() if isinstance(col, np.ndarray) else iter(col) for col in self.columns.values()))

    def digest(self) -> str:
        """What the entries are (not where they came from): equal listings give equal digests."""
        h = hashlib.sha256()
        for name, col in self.columns.items():
            h.update(name.encode())
            if isinstance(col, PackedStrings):
                col.hash_into(h)
            else:
                arr = np.ascontiguousarray(col)
                h.update(arr.dtype.str.encode())
                h.update(memoryview(arr))
        return h.hexdigest()


def int_columns(rows: Iterable[tuple[int, ...]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Integer tuples -> one int64 array per name, without a Python object per value on the way."""
    cols = [array("q") for _ in names]
    for row in rows:
        for col, v in zip(cols, row):
            col.append(v)
    return {name: np.frombuffer(col, dtype=np.int64).copy() if len(col) else np.zeros(0, np.int64)
            for name, col in zip(names, cols)}
