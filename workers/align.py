"""Ray side of the align stage: one MTCNN per actor, one input shard per task, resumable.

``align_artifact`` runs ``tasks.align.align_table`` over every shard of an image table through
``workers.sharded.run_sharded``: each actor builds its detector once (TensorFlow + MTCNN take
seconds to load), output shards keep their input shard's index, and a rerun after a crash only
redoes the shards whose output is not in place yet. Rejects go to ``<out>/rejects``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any, Callable, Mapping

import pyarrow as pa

from storage.artifact import Artifact, Manifest, ShardInfo
from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA
from tasks.align import AlignConfig, Detector, align_table, make_detector, needs_detector
from workers.sharded import PoolConfig, run_sharded

STAGE = "align"


def _processor(cfg: AlignConfig, threads: int) -> Callable[[pa.Table], tuple[pa.Table, pa.Table]]:
    """Runs once per actor. The detector is built on the first shard that needs one, so data sets
    that ship landmarks (or detect="never") never load TensorFlow at all."""
    import cv2

    cv2.setNumThreads(threads)  # the actor owns `threads` CPUs; OpenCV would take them all
    cache: dict[str, Detector] = {}

    def fn(table: pa.Table) -> tuple[pa.Table, pa.Table]:
        detector = None
        if needs_detector(table, cfg):
            if "mtcnn" not in cache:
                cache["mtcnn"] = make_detector(threads)
            detector = cache["mtcnn"]
        return align_table(table, detector, cfg)

    return fn


def align_artifact(
    in_uri: str,
    out_uri: str,
    cfg: AlignConfig,
    *,
    pool: PoolConfig = PoolConfig(),
    on_shard: Callable[[int, ShardInfo, int], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Align every image of ``in_uri`` into ``out_uri`` (+ ``out_uri/rejects``). Needs Ray connected.

    ``on_shard(index, info, rejected_rows)`` is called as shards finish (progress bars).
    """
    src = Artifact(in_uri)
    names = src.schema.names
    missing = [c for c in ("id", "image") if c not in names]
    if missing:
        raise ValueError(
            f"{in_uri} has no {' and '.join(missing)} column: align reads an image table "
            "(the output of `fermine ingest`)"
        )
    columns = [c for c in IMAGE_SCHEMA.names if c in names]
    factory = functools.partial(_processor, cfg, max(1, int(pool.num_cpus)))
    return run_sharded(
        in_uri,
        out_uri,
        factory,
        stage=STAGE,
        config=asdict(cfg),
        inputs={"images": src.digest},
        pool=pool,
        columns=columns,
        with_rejects=True,
        rejects_schema=REJECTS_SCHEMA,
        on_shard=on_shard,
        extra=extra,
    )
