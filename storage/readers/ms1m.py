"""MS-Celeb-1M as an unlabeled face pool (label null, split "pool"), in its two common releases.

(a) insightface RecordIO: ``train.rec`` + ``train.idx``, read directly (mxnet is retired and
    breaks with numpy 2). ``train.idx`` has "key<TAB>offset" lines. Each record in ``train.rec``
    is: uint32 magic 0xced7230a, uint32 lrecord (upper 3 bits: continuation flag, lower 29 bits:
    length), the payload, zero padding to a 4-byte boundary. A record whose payload contained the
    magic number at an aligned position is split there into parts (flag 1 = first, 2 = middle,
    3 = last) and the magic is re-inserted between them when joining (dmlc-core's RecordIOReader).
    A payload is an IRHeader ``<IfQQ`` (flag, label, id, id2); ``flag`` > 0 means ``flag`` float32
    labels follow; then the JPEG bytes. Record 0 is a header whose first label is the number of
    images + 1: images are keys 1 .. label[0]-1 (the keys after them describe identities).
(b) face.evoLVe image folders: ``root/<identity>/<n>.jpg``.

The release is detected by the presence of ``train.rec``. Options ``start`` and ``limit`` take a
slice of the images in file order, so a pool can be ingested in parts. With ``train.idx`` (and for
the folder release) the reader is splittable: ``entries`` lists the images once, ``read_entries``
reads any slice of them, which is how the parallel ingest (workers.ingest) splits the release.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from storage.readers import register, register_splittable
from storage.readers._common import as_bool, as_int, image_bytes, list_images, load_image, subdirs
from storage.readers.base import DatasetFormatError, Entries, PackedStrings, Record, Reject, int_columns

SOURCE = "ms1m"
MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24


class RecordError(ValueError):
    """A record that cannot be read; the message says what is wrong with it."""


def read_record(f: BinaryIO) -> bytes | None:
    """The next (possibly multi-part) record at the current position; None at a clean end of file."""
    parts: list[bytes] = []
    while True:
        pos = f.tell()
        head = f.read(8)
        if not head and not parts:
            return None
        if len(head) < 8:
            raise RecordError(f"truncated record header at offset {pos}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordError(f"bad record magic {magic:#010x} at offset {pos} (expected {MAGIC:#010x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if cflag > 3:
            raise RecordError(f"bad continuation flag {cflag} at offset {pos}")
        if not parts and cflag in (2, 3):
            raise RecordError(f"offset {pos} is the middle of a multi-part record, not its start")
        if parts and cflag in (0, 1):
            raise RecordError(f"multi-part record interrupted by a new record at offset {pos}")
        data = f.read(length)
        if len(data) < length:
            raise RecordError(f"truncated record at offset {pos}: {len(data)} of {length} bytes")
        f.read((-length) % 4)  # padding to a 4-byte boundary
        parts.append(data)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


def unpack(payload: bytes) -> tuple[int, np.ndarray, int, int, bytes]:
    """(flag, labels, id, id2, image bytes) of a record payload (mxnet.recordio.unpack)."""
    if len(payload) < IR_SIZE:
        raise RecordError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack(IR_FORMAT, payload[:IR_SIZE])
    rest = payload[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordError(f"IRHeader announces {flag} labels but the payload is too short")
        labels = np.frombuffer(rest[: 4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    else:
        labels = np.array([label], dtype=np.float32)
    return flag, labels, id1, id2, rest


BAD_LINE = -1  # the offset of a plan entry that stands for a malformed .idx line (its key is the line number)


def _index_lines(path: str) -> Iterator[tuple[int, int]]:
    """(key, offset) per .idx line, (line number, BAD_LINE) for a line that is not 'key<TAB>offset'."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, offset = int(parts[0]), int(parts[1])
                if len(parts) != 2 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                yield n, BAD_LINE
                continue
            yield key, offset


def _bad_line(n: int, idx_path: str) -> Reject:
    return Reject(f"{SOURCE}/idx-line-{n}", f"bad index line: line {n} of {idx_path} is not 'key<TAB>offset'")


def _header(rec_path: str, idx_path: str | None) -> tuple[int | None, bool]:
    """(number of images or None if unknown, whether record 0 is a header), read eagerly."""
    offset = 0
    if idx_path is not None:
        first = next((e for e in _index_lines(idx_path) if e[1] != BAD_LINE), None)
        if first is None:
            raise DatasetFormatError(f"{idx_path} has no 'key<TAB>offset' lines; it should index {rec_path}")
        if first[0] != 0:
            return None, False
        offset = first[1]
    with open(rec_path, "rb") as f:
        f.seek(offset)
        try:
            payload = read_record(f)
            if payload is None:
                raise RecordError("the file is empty")
            flag, labels, *_ = unpack(payload)
        except RecordError as e:
            raise DatasetFormatError(f"{rec_path} is not an insightface RecordIO file: {e}") from None
    if flag > 0 and labels[0] >= 1:
        return int(labels[0]) - 1, True
    return None, False


def _options(start: Any, limit: Any, verify: Any) -> tuple[int, int | None, bool]:
    return (as_int(start, "start", minimum=0), as_int(limit, "limit", minimum=0, allow_none=True),
            as_bool(verify, "verify"))


def _rec_path(root: str, rec: Any) -> str | None:
    """The record file when ROOT is the RecordIO release (or the .rec itself), None for the folder release."""
    if os.path.isfile(root) and root.endswith(".rec"):
        return root
    if not os.path.isdir(root):
        raise DatasetFormatError(f"expected the MS-Celeb-1M folder at {root}, but it is not a folder")
    rec_path = os.path.join(root, str(rec))
    return rec_path if os.path.isfile(rec_path) else None


def _idx_of(rec_path: str) -> str | None:
    idx_path = os.path.splitext(rec_path)[0] + ".idx"
    return idx_path if os.path.isfile(idx_path) else None


def _identities(root: str, rec: Any) -> list[str]:
    identities = subdirs(root)
    if not identities:
        raise DatasetFormatError(
            f"expected MS-Celeb-1M in {root} as insightface {rec} + {os.path.splitext(str(rec))[0]}.idx, "
            "or as face.evoLVe folders <identity>/<n>.jpg; found neither"
        )
    return identities


@register("ms1m")
def read(root: str, *, start: Any = 0, limit: Any = None, verify: Any = True, rec: Any = "train.rec") -> Iterator[Record]:
    """Options: start (skip this many images), limit (at most this many images), verify (decode
    each image to reject corrupt ones, default true), rec (record file name, default train.rec;
    its index is the same name with .idx)."""
    start, limit, verify = _options(start, limit, verify)
    rec_path = _rec_path(root, rec)
    if rec_path is not None:
        idx = _idx_of(rec_path)
        count, has_header = _header(rec_path, idx)
        if idx is None:
            return _sequential(rec_path, count, has_header, start, limit, verify)
        return _read_indexed(rec_path, idx, verify, _plan_indexed(idx, count, has_header, start, limit))
    return _read_folders(root, verify, _plan_folders(root, _identities(root, rec), start, limit))


def entries(root: str, *, start: Any = 0, limit: Any = None, verify: Any = True,
            rec: Any = "train.rec") -> Entries | None:
    """What ``read`` reads with these options, listed once (None for a RecordIO file without .idx:
    its records can only be found one after the other). For train.idx, the (key, offset) pairs as
    int64 arrays: 16 bytes per image, ~90 MB for the 5.8M-image release."""
    start, limit, verify = _options(start, limit, verify)
    rec_path = _rec_path(root, rec)
    if rec_path is not None:
        idx = _idx_of(rec_path)
        count, has_header = _header(rec_path, idx)
        if idx is None:
            return None
        cols = int_columns(_plan_indexed(idx, count, has_header, start, limit), ("key", "offset"))
        return Entries(cols, {"kind": "recordio", "rec": rec_path, "idx": idx, "verify": verify})
    rels = PackedStrings.from_iter(f"{ident}/{name}" for ident, name in
                                   _plan_folders(root, _identities(root, rec), start, limit))
    return Entries({"rel": rels}, {"kind": "folders", "root": root, "verify": verify})


def read_entries(part: Entries) -> Iterator[Record]:
    """The records of a slice of ``entries(...)``: those ``read`` yields for these entries."""
    ctx = part.context
    if ctx["kind"] == "recordio":
        return _read_indexed(ctx["rec"], ctx["idx"], ctx["verify"], part.rows())
    # An identity folder name holds no "/", so the first one separates it from the file name.
    return _read_folders(ctx["root"], ctx["verify"], (tuple(rel.split("/", 1)) for (rel,) in part.rows()))


register_splittable("ms1m", entries, read_entries)


def _take(start: int, limit: int | None):
    """A counter that says, per image in order, whether to skip it, take it, or stop."""
    state = {"seen": 0}

    def decide() -> str:
        i = state["seen"]
        state["seen"] += 1
        if i < start:
            return "skip"
        if limit is not None and i >= start + limit:
            return "stop"
        return "take"

    return decide


def _image_record(rid: str, data: bytes, verify: bool) -> Record:
    if verify:
        got = image_bytes(rid, data)
        if isinstance(got, Reject):
            return got
        data = got[0]
    elif not data:
        return Reject(rid, "corrupt: empty image bytes")
    return dict(id=rid, image=data, label=None, split="pool", source=SOURCE)


def _plan_indexed(idx_path: str, count: int | None, has_header: bool, start: int,
                  limit: int | None) -> Iterator[tuple[int, int]]:
    """(key, offset) of each record the reader reads, in .idx order, and (line, BAD_LINE) for each
    malformed line it reports: a bad line is reported where it stands, before and after ``start``,
    up to the image that ends the ``limit``."""
    decide = _take(start, limit)
    for key, offset in _index_lines(idx_path):
        if offset == BAD_LINE:
            yield key, offset
            continue
        if has_header and (key == 0 or (count is not None and key > count)):
            continue  # the header, or the identity records that follow the images
        step = decide()
        if step == "skip":
            continue
        if step == "stop":
            return
        yield key, offset


def _read_indexed(rec_path: str, idx_path: str, verify: bool, plan: Iterable[tuple[int, int]]) -> Iterator[Record]:
    with open(rec_path, "rb") as f:
        for key, offset in plan:
            if offset == BAD_LINE:
                yield _bad_line(key, idx_path)
                continue
            rid = f"{SOURCE}/{key}"
            try:
                if f.tell() != offset:  # records are usually in index order: no seek needed
                    f.seek(offset)
                payload = read_record(f)
                if payload is None:
                    raise RecordError(f"offset {offset} is past the end of {rec_path}")
                *_, img = unpack(payload)
            except RecordError as e:
                yield Reject(rid, f"corrupt: {e}")
                continue
            yield _image_record(rid, img, verify)


def _sequential(rec_path: str, count: int | None, has_header: bool, start: int, limit: int | None,
                verify: bool) -> Iterator[Record]:
    """No index: read records in file order; the key of a record is its ordinal."""
    decide = _take(start, limit)
    with open(rec_path, "rb") as f:
        key = -1
        while True:
            key += 1
            if has_header and count is not None and key > count:
                return  # identity records follow the images
            rid = f"{SOURCE}/{key}"
            try:
                payload = read_record(f)
            except RecordError as e:
                # Without an index there is no next offset to resynchronise on: report and stop.
                yield Reject(rid, f"corrupt: {e}; the records after it cannot be located without "
                             f"{os.path.basename(os.path.splitext(rec_path)[0])}.idx")
                return
            if payload is None:
                return
            if has_header and key == 0:
                continue
            step = decide()
            if step == "skip":
                continue
            if step == "stop":
                return
            try:
                *_, img = unpack(payload)
            except RecordError as e:
                yield Reject(rid, f"corrupt: {e}")
                continue
            yield _image_record(rid, img, verify)


def _plan_folders(root: str, identities: list[str], start: int, limit: int | None) -> Iterator[tuple[str, str]]:
    """(identity, file name) of each image the reader reads, in order."""
    seen = 0
    for ident in identities:
        names = list_images(os.path.join(root, ident))
        if seen + len(names) <= start:  # skip whole identities without looking at their files
            seen += len(names)
            continue
        for name in names:
            if seen < start:
                seen += 1
                continue
            if limit is not None and seen >= start + limit:
                return
            seen += 1
            yield ident, name


def _read_folders(root: str, verify: bool, plan: Iterable[tuple[str, str]]) -> Iterator[Record]:
    for ident, name in plan:
        rid = f"{SOURCE}/{ident}/{os.path.splitext(name)[0]}"
        path = os.path.join(root, ident, name)
        if verify:
            got = load_image(rid, path)
            yield got if isinstance(got, Reject) else dict(id=rid, image=got[0], label=None, split="pool",
                                                            source=SOURCE)
        else:
            with open(path, "rb") as fh:
                yield _image_record(rid, fh.read(), False)
