"""Turn a stream of reader records into an image-table artifact plus its rejects artifact.

Two ways to write the same table:

* ``write_image_table``: one process streams every record (any reader);
* ``write_part`` + ``commit_parts``: a splittable source (storage.readers.Splittable) read in parts,
  possibly by many processes (workers.ingest); part ``i`` becomes shard ``i`` of the table and of
  its rejects, written atomically, so a killed ingest resumes by redoing the missing parts only.

Both validate records with ``sort_record`` and count rejects and sources the same way, so the
same source gives the same rows, rejects and manifest extras in the same order either way (only
the shard boundaries differ).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifact import (
    CLAIM,
    ArtifactError,
    ArtifactWriter,
    Manifest,
    ShardedWriter,
    ShardInfo,
    claim,
    clear_unfinished,
    is_finished,
    join,
    reopen,
    shard_name,
)
from storage.readers.base import Record, Reject
from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA, image_row

REJECTS = "rejects"


def rejects_uri(uri: str) -> str:
    return join(uri, REJECTS)


# ---- validation, shared by both paths ------------------------------------------------------
def sort_record(rec: Record, stage: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(image row, None) for a valid record; (None, rejects row) for a reader's Reject or a row that
    fails validation (a label outside the class list, bad landmarks)."""
    if not isinstance(rec, Reject):
        try:
            return image_row(**rec), None
        except (TypeError, ValueError) as e:
            rec = Reject(str(rec.get("id", "?")), f"invalid row: {e}")
    return None, {"id": rec.id, "reason": rec.reason, "source": stage}


def reason_kind(reason: str) -> str:
    """The counted kind of a reject reason: the words before its first colon ("corrupt", "bad label")."""
    return reason.split(":")[0]


@dataclass
class Tally:
    """Rejects by reason kind and rows by source: the image table's manifest extras."""

    reasons: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)

    def add(self, row: Mapping[str, Any] | None, reject: Mapping[str, Any] | None) -> None:
        if row is not None:
            self.sources[row["source"]] += 1
        if reject is not None:
            self.reasons[reason_kind(reject["reason"])] += 1

    def extra(self) -> dict[str, Any]:
        return {"rejects": sum(self.reasons.values()), "reject_reasons": dict(self.reasons),
                "sources": dict(self.sources)}


# ---- one process ---------------------------------------------------------------------------
def write_image_table(
    records: Iterable[Record],
    uri: str,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str] | None = None,
    rows_per_shard: int = 1024,
    on_record: Callable[[Record], None] | None = None,
) -> Manifest:
    """Write rows and rejects; commit rejects first, the image table's manifest last.

    A stream cannot be resumed part way (the next record's position is unknown), so an unfinished
    folder is cleared first; splittable sources resume part by part (write_part / commit_parts).
    Rows that fail validation (a label outside the class list, bad landmarks) become rejects.
    """
    if is_finished(uri):
        raise FileExistsError(f"{uri} is already a finished artifact; choose another output or delete it")
    clear_unfinished(uri, subfolders=(REJECTS,))
    tally = Tally()
    rej = ArtifactWriter(rejects_uri(uri), stage=f"{stage}.rejects", config=config, inputs=inputs,
                         rows_per_shard=rows_per_shard * 16, schema=REJECTS_SCHEMA)
    out = ArtifactWriter(uri, stage=stage, config=config, inputs=inputs,
                         rows_per_shard=rows_per_shard, schema=IMAGE_SCHEMA)
    buf: list[dict[str, Any]] = []
    rbuf: list[dict[str, Any]] = []
    for rec in records:
        if on_record is not None:
            on_record(rec)
        row, reject = sort_record(rec, stage)
        tally.add(row, reject)
        if reject is not None:
            rbuf.append(reject)
            continue
        buf.append(row)
        if len(buf) >= 256:
            out.write_rows(buf)
            buf = []
    out.write_rows(buf)
    rej.write_rows(rbuf)
    rej.commit()
    return out.commit(extra=tally.extra())


# ---- in parts ------------------------------------------------------------------------------
def begin_parts(uri: str, key: Mapping[str, Any]) -> Manifest | None:
    """Make ``uri`` the output of the part-wise ingest described by ``key`` (storage.artifact.claim).

    Returns the manifest when that same ingest already finished it; None when there is work to do
    (finished parts are kept). What an interrupted one-process ingest left (shards, no claim) is
    cleared first, as write_image_table would; another computation's output is refused
    (FileExistsError), and so is a folder holding anything but artifact files (ArtifactError).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not is_finished(uri) and not fs.exists(f"{path.rstrip('/')}/{CLAIM}"):
        clear_unfinished(uri, subfolders=(REJECTS,))
    finished = claim(uri, key)
    if finished is None:
        # A crash between the two commits leaves committed rejects: their shards are kept.
        reopen(rejects_uri(uri))
    return finished


def write_part(records: Iterable[Record], uri: str, index: int, *, stage: str) -> tuple[ShardInfo, ShardInfo]:
    """Write one part's rows as shard ``index`` of ``uri`` and its rejects as shard ``index`` of
    ``uri/rejects``. Rejects go first: the image shard's marker is what says "this part is done".
    Returns (image shard info, rejects shard info)."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for rec in records:
        row, reject = sort_record(rec, stage)
        if reject is not None:
            rejects.append(reject)
        else:
            rows.append(row)
    name = shard_name(index)
    rinfo = ShardedWriter(rejects_uri(uri)).write_shard(name, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
    info = ShardedWriter(uri).write_shard(name, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    return info, rinfo


def done_parts(uri: str, parts: int) -> set[int]:
    """The parts of ``uri`` whose image and rejects shards are both in place."""
    done, rdone = ShardedWriter(uri).done(), ShardedWriter(rejects_uri(uri)).done()
    return {i for i in range(parts) if shard_name(i) in done and shard_name(i) in rdone}


def commit_parts(
    uri: str,
    parts: int,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str] | None = None,
) -> Manifest:
    """Commit the rejects, then the image table, of an ingest written as ``parts`` parts.

    Shards keep their part's order; parts that kept no rows (or rejected none) are left out of the
    manifest, as the one-process writer never writes an empty shard unless the table is empty.
    The manifest extras are counted from the shards, so parts finished by an earlier, killed
    attempt count exactly like the others.
    """
    names = [shard_name(i) for i in range(parts)]
    out, rej = ShardedWriter(uri), ShardedWriter(rejects_uri(uri))
    done, rdone = out.done(), rej.done()
    missing = [n for n in names if n not in done or n not in rdone]
    if missing:
        raise ArtifactError(f"cannot commit {uri}: parts not written yet: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}; rerun the ingest to write them")
    out_order, rorder = _nonempty(names, done), _nonempty(names, rdone)
    rej.commit(f"{stage}.rejects", config, inputs, rorder)
    tally = Tally(reasons=_count(rejects_uri(uri), rorder, "reason", reason_kind),
                  sources=_count(uri, out_order, "source"))
    return out.commit(stage, config, inputs, out_order, tally.extra())


def _nonempty(names: list[str], done: Mapping[str, ShardInfo]) -> list[str]:
    kept = [n for n in names if done[n].rows > 0]
    return kept or names[:1]  # an empty table is still one (empty) shard, which keeps the schema


def _count(uri: str, names: list[str], column: str, key: Callable[[str], str] | None = None) -> Counter[str]:
    """Values of one column over the named shards, reading that column only (not the images)."""
    fs, path = fsspec.core.url_to_fs(uri)
    counts: Counter[str] = Counter()
    for name in names:
        with fs.open(f"{path.rstrip('/')}/{name}", "rb") as f:
            col = pq.ParquetFile(f).read(columns=[column]).column(column)
        for r in pc.value_counts(col).to_pylist():
            value = r["values"]
            counts[key(value) if key and value is not None else value] += r["counts"]
    return counts
