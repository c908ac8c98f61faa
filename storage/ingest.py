"""Turn a stream of reader records into an image-table artifact plus its rejects artifact."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Mapping

from storage.artifact import ArtifactWriter, Manifest, clear_unfinished, is_finished, join
from storage.readers.base import Record, Reject
from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA, image_row

REJECTS = "rejects"


def rejects_uri(uri: str) -> str:
    return join(uri, REJECTS)


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

    Ingest is not shard-resumable (readers stream), so an unfinished folder is cleared first.
    Rows that fail validation (a label outside the class list, bad landmarks) become rejects.
    """
    if is_finished(uri):
        raise FileExistsError(f"{uri} is already a finished artifact; choose another output or delete it")
    clear_unfinished(uri, subfolders=(REJECTS,))
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    rej = ArtifactWriter(rejects_uri(uri), stage=f"{stage}.rejects", config=config, inputs=inputs,
                         rows_per_shard=rows_per_shard * 16, schema=REJECTS_SCHEMA)
    out = ArtifactWriter(uri, stage=stage, config=config, inputs=inputs,
                         rows_per_shard=rows_per_shard, schema=IMAGE_SCHEMA)
    buf: list[dict[str, Any]] = []
    rbuf: list[dict[str, Any]] = []
    for rec in records:
        if on_record is not None:
            on_record(rec)
        if not isinstance(rec, Reject):
            try:
                row = image_row(**rec)
            except (TypeError, ValueError) as e:
                rec = Reject(str(rec.get("id", "?")), f"invalid row: {e}")
            else:
                buf.append(row)
                sources[row["source"]] += 1
                if len(buf) >= 256:
                    out.write_rows(buf)
                    buf = []
                continue
        reasons[rec.reason.split(":")[0]] += 1
        rbuf.append({"id": rec.id, "reason": rec.reason, "source": stage})
    out.write_rows(buf)
    rej.write_rows(rbuf)
    rej.commit()
    return out.commit(extra={"rejects": sum(reasons.values()), "reject_reasons": dict(reasons),
                             "sources": dict(sources)})
