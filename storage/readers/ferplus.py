"""FERPlus: ``fer2013new.csv`` (10 annotators' votes per FER2013 image) + FER2013's own pixels.

fer2013new.csv has columns Usage, Image name, neutral, happiness, surprise, sadness, anger,
disgust, fear, contempt, unknown, NF, one row per fer2013.csv row in the same order (row ``i`` is
``fer{i:07d}.png``; an empty name means FER+ dropped the image). The label is the vote winner;
winners contempt / unknown / NF, ties and (optionally) winners short of a required share become
rejects with that reason.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import as_float, one_of
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.readers.fer2013 import csv_columns, csv_rows, find_csv, pixels_png, usage_split
from storage.schema import CLASS_INDEX

SOURCE = "ferplus"
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
VOTE_TO_CLASS = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                 "anger": "anger", "disgust": "disgust", "fear": "fear"}
NOT_BASIC = {"contempt": "contempt: not a basic class", "unknown": "unknown: annotators could not tell",
             "NF": "not a face (NF)"}


def _find_new_csv(root: str) -> str:
    if os.path.isfile(root):
        return root
    for cand in (os.path.join(root, "fer2013new.csv"), os.path.join(root, "FERPlus", "fer2013new.csv")):
        if os.path.isfile(cand):
            return cand
    raise DatasetFormatError(f"expected FERPlus's fer2013new.csv at {root}; point ROOT at it or its folder")


@register("ferplus")
def read(root: str, *, fer2013_csv: Any = None, ties: Any = "reject", min_share: Any = 0.0) -> Iterator[Record]:
    """Options: fer2013_csv (path of the original fer2013.csv with the pixels; default: next to
    fer2013new.csv or under ROOT), ties (reject | first: a tie goes to the first column in file
    order), min_share (the winner needs more than this fraction of the votes, e.g. 0.5 for a strict
    majority; default 0 = plurality)."""
    new_path = _find_new_csv(root)
    ties = one_of(ties, "ties", ("reject", "first"))
    min_share = as_float(min_share, "min_share")
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"option min_share must be in [0, 1), got {min_share}")
    if fer2013_csv is None:
        here = os.path.dirname(new_path)
        try:
            old_path = find_csv(here)
        except DatasetFormatError:
            raise DatasetFormatError(
                f"FERPlus needs the original fer2013.csv for the pixels; none found next to {new_path}. "
                "Put it there or pass the option fer2013_csv=PATH"
            ) from None
    else:
        old_path = find_csv(str(fer2013_csv))
    new_cols = csv_columns(new_path, ("Usage", "Image name", *VOTE_COLUMNS))
    old_cols = csv_columns(old_path, ("pixels", "Usage"))
    return _records(new_path, new_cols, old_path, old_cols, ties, min_share)


def _winner(votes: dict[str, float], ties: str, min_share: float) -> str | Reject:
    """The winning column, or the reason (as a Reject with an empty id) there is none."""
    total = sum(votes.values())
    if total <= 0:
        return Reject("", "no votes")
    best = max(votes.values())
    top = [c for c in VOTE_COLUMNS if votes[c] == best]
    if len(top) > 1 and ties == "reject":
        return Reject("", f"tie: {' = '.join(top)} ({best:g} votes each)")
    if best / total <= min_share:
        return Reject("", f"no majority: {top[0]} has {best:g} of {total:g} votes (needs > {min_share:g})")
    return top[0]


def _records(new_path: str, new_cols: dict[str, int], old_path: str, old_cols: dict[str, int], ties: str,
             min_share: float) -> Iterator[Record]:
    iu, iname = new_cols["Usage"], new_cols["Image name"]
    ivotes = [new_cols[c] for c in VOTE_COLUMNS]
    ip, iou = old_cols["pixels"], old_cols["Usage"]
    width = max(iu, iname, *ivotes) + 1
    old_rows = csv_rows(old_path)  # row i of fer2013new.csv describes row i of fer2013.csv
    for i, row in enumerate(csv_rows(new_path)):
        old = next(old_rows, None)
        name = row[iname].strip() if len(row) > iname else ""
        rid = f"{SOURCE}/{os.path.splitext(name)[0]}" if name else f"{SOURCE}/row-{i:05d}"
        if not name:
            yield Reject(rid, "dropped by FER+: no image name in fer2013new.csv")
            continue
        if len(row) < width:
            yield Reject(rid, f"bad line: {len(row)} fields, expected {width}")
            continue
        if old is None:
            yield Reject(rid, f"missing: fer2013.csv has no row {i} for {name}")
            continue
        stem = os.path.splitext(name)[0]
        if stem.startswith("fer") and stem[3:].isdigit() and int(stem[3:]) != i:
            yield Reject(rid, f"mismatch: {name} is on row {i} of fer2013new.csv; the two csv files are not aligned")
            continue
        split = usage_split(row[iu])
        if split is None:
            yield Reject(rid, f"bad split: Usage {row[iu]!r} is not Training, PublicTest or PrivateTest")
            continue
        if len(old) > iou and usage_split(old[iou]) != split:
            yield Reject(rid, f"mismatch: Usage {row[iu]!r} differs from fer2013.csv's {old[iou]!r} on row {i}")
            continue
        try:
            votes = {c: float(row[j] or 0) for c, j in zip(VOTE_COLUMNS, ivotes)}
            if any(v < 0 for v in votes.values()):
                raise ValueError
        except ValueError:
            yield Reject(rid, f"bad label: vote counts {[row[j] for j in ivotes]} are not non-negative numbers")
            continue
        win = _winner(votes, ties, min_share)
        if isinstance(win, Reject):
            yield Reject(rid, win.reason)
            continue
        if win in NOT_BASIC:
            yield Reject(rid, NOT_BASIC[win])
            continue
        if len(old) <= ip:
            yield Reject(rid, f"corrupt: fer2013.csv row {i} has no pixels")
            continue
        png = pixels_png(rid, old[ip])
        if isinstance(png, Reject):
            yield png
            continue
        yield dict(id=rid, image=png, label=CLASS_INDEX[VOTE_TO_CLASS[win]], split=split, source=SOURCE)
