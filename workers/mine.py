"""The mining job on Ray: actors that hold the primitive model stream the pool shard by shard.

Built on workers.sharded.run_sharded (Ray actors over shards) rather than Ray Data ``map_batches``:
each output shard is written by the actor, atomically, under its input shard's index, which is what
gives exactly-once output and resume (a rerun or a restarted actor redoes only unfinished shards),
and the driver never sees image bytes or features. Per actor: one model on its GPU (or CPU threads),
one input shard in memory at a time, only the kept rows written back, so memory does not grow with
the pool and the pool's feature matrix never exists anywhere.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from storage.artifact import Artifact, Manifest, _fs, claim, identity, join, shard_name
from storage.schema import CLASSES, REJECTS_SCHEMA
from tasks.omni.centroids import checkpoint_digest
from tasks.omni.mine import CODE_VERSION, STAGE, MineConfig, build_processor, mined_rows, pool_columns
from workers.cluster import RayConfig, connect
from workers.sharded import default_pool, run_sharded


# Settings that change which rows are kept (the others only change speed).
_RESULT_FIELDS = ("margin", "floor", "center", "splits", "input_size", "source_prefix", "amp")


@dataclass(frozen=True)
class MineResult:
    uri: str
    manifest: Manifest
    counts: dict[str, int]  # kept rows per pseudo class (class name -> rows)
    kept: int
    examined: int  # pool rows considered (in the mined splits), decodable or not
    rejected: int  # undecodable rows (listed in <uri>/rejects)
    seconds: float  # wall time of this call (0 when an existing artifact was reused)
    reused: bool

    @property
    def images_per_s(self) -> float:
        return self.examined / self.seconds if self.seconds > 0 else float("nan")


def _class_name(k: int) -> str:
    return CLASSES[k] if 0 <= k < len(CLASSES) else str(k)


def _summary(pool_uri: str, out_uri: str, splits: tuple[str, ...] | None, static: dict[str, Any]) -> dict[str, Any]:
    """Manifest extras, computed by run_sharded once every shard is written.

    Counts come from the written shards (resumed ones included), not from progress callbacks, so a
    run resumed after a crash reports the same counts as one that never stopped.
    """
    pool = Artifact(pool_uri)
    counts: Counter[int] = Counter()
    for i in range(pool.num_shards):
        t = _read_parquet(out_uri, shard_name(i), ["label"])
        counts.update(int(v) for v in pc.drop_null(t.column("label")).to_pylist())
    examined = _count_rows(pool, splits)
    kept = sum(counts.values())
    return {
        **static,
        "counts": {_class_name(k): counts.get(k, 0) for k in sorted(set(counts) | set(range(len(CLASSES))))},
        "kept": kept, "examined": examined,
        "kept_fraction": kept / examined if examined else 0.0,
    }


def _read_parquet(uri: str, name: str, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = _fs(join(uri, name))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _count_rows(pool: Artifact, splits: tuple[str, ...] | None) -> int:
    if "split" not in pool.schema.names:
        return len(pool)
    n = 0
    for i in range(pool.num_shards):  # one shard's split column at a time
        col = pool.read_shard(i, ["split"]).column("split")
        n += pc.sum(mined_rows(col, splits).cast(pa.int64())).as_py() or 0
    return n


def mine_pool(
    checkpoint_uri: str,
    centroids_uri: str,
    pool_uri: str,
    out_uri: str,
    cfg: MineConfig = MineConfig(),
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    ray_cfg: RayConfig | None = None,
    on_shard: Callable[[int, Any, int], None] | None = None,
    max_retries: int = 3,
) -> MineResult:
    """Mine ``pool_uri`` (any image table) into the auxiliary samples table at ``out_uri``.

    Resumable: rerunning with the same inputs and settings redoes only the shards not yet written, and
    returns the finished artifact at once when there is one. ``on_shard(index, info, undecodable)``
    is called on the driver as shards finish (progress).
    """
    pool = Artifact(pool_uri)
    columns = pool_columns(pool.schema.names)
    inputs = {"checkpoint": checkpoint_digest(checkpoint_uri), "centroids": Artifact(centroids_uri).digest,
              "pool": pool.digest}
    config = asdict(cfg)
    ident = identity(STAGE, {k: config[k] for k in _RESULT_FIELDS}, inputs, CODE_VERSION)
    key = {"stage": STAGE, "identity": ident}  # resumable across speed-only settings (batch size, threads)
    if (m := claim(out_uri, key)) is not None:
        return _result(out_uri, m, 0.0, True)
    connect(ray_cfg)
    pc_ = default_pool(workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    pc_ = replace(pc_, max_retries=max_retries)
    run_cfg = cfg
    if cfg.torch_threads is None and pc_.num_gpus == 0:
        run_cfg = replace(run_cfg, torch_threads=max(1, int(pc_.num_cpus)))
    if pc_.num_gpus > 0 and cfg.decode_threads <= 1:
        run_cfg = replace(run_cfg, decode_threads=max(1, int(pc_.num_cpus) - 1))
    factory = functools.partial(build_processor, checkpoint_uri, centroids_uri, run_cfg)
    summary = functools.partial(_summary, pool_uri, out_uri, cfg.splits, {
        "identity": ident, "checkpoint": checkpoint_uri, "centroids": centroids_uri, "pool": pool_uri,
        "actors": pc_.num_actors, "gpus_per_actor": pc_.num_gpus,
    })
    t0 = time.perf_counter()
    m = run_sharded(pool_uri, out_uri, factory, stage=STAGE, config=config, inputs=inputs, pool=pc_,
                    columns=columns, with_rejects=True, rejects_schema=REJECTS_SCHEMA, on_shard=on_shard,
                    extra=summary, claim_key=key)
    return _result(out_uri, m, time.perf_counter() - t0, False)


def _result(uri: str, m: Manifest, seconds: float, reused: bool) -> MineResult:
    ex = m.extra
    return MineResult(uri=uri, manifest=m, counts=dict(ex.get("counts", {})), kept=int(ex.get("kept", m.rows)),
                      examined=int(ex.get("examined", 0)), rejected=int(ex.get("rejects", 0)),
                      seconds=seconds, reused=reused)
