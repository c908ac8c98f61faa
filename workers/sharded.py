"""Run a per-shard computation over an artifact on a pool of Ray actors, resumably.

Pattern from Ray's batch-inference examples: each actor builds its model once (the
``factory``) and then processes whole input shards. Every output shard is written by the actor
itself, atomically and under the input shard's index, so:

* a rerun after a crash skips shards whose output is already in place;
* a worker killed mid-shard is restarted by Ray and the shard is redone; a duplicate attempt
  rewrites the same file, so every row lands exactly once;
* the driver only ever holds small ShardInfo records, never the data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from storage.artifact import Artifact, Manifest, ShardedWriter, ShardInfo, claim, join, reopen, shard_name

log = logging.getLogger(__name__)

# A processor maps one input shard to (output table, rejects table or None).
Processor = Callable[[pa.Table], "tuple[pa.Table, pa.Table | None]"]
ProcessorFactory = Callable[[], Processor]

REJECTS = "rejects"


class ShardFailedError(RuntimeError):
    """A shard kept failing after its retries; the message names the shard and the last error."""


@dataclass(frozen=True)
class PoolConfig:
    num_actors: int = 1
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; 0 = CPU
    max_retries: int = 3  # per shard, for application errors; killed workers are restarted by Ray
    wait_s: float = 0.0  # how long to wait for nodes that can hold the actors (autoscaling clusters)


def default_pool(workers: int | None = None, *, gpus_per_worker: float | None = None,
                 cpus_per_worker: float | None = None) -> PoolConfig:
    """Actors for the connected cluster: one per GPU when it has GPUs, else one per 2 CPUs.

    None = decide from ``ray.cluster_resources()``. On GPU nodes the CPUs feed the GPUs (decoding);
    on CPU nodes they run the model (torch threads = the actor's CPUs).
    """
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else max(1, int(cpus // 2))
    workers = max(1, workers)
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, min(8.0, cpus // workers)) if cpus >= workers else max(0.1, cpus / workers)
    return PoolConfig(num_actors=workers, num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)


@ray.remote
class ShardActor:
    def __init__(self, factory: ProcessorFactory):
        self.fn = factory()

    def process(self, in_uri: str, index: int, out_uri: str, columns: list[str] | None) -> tuple[ShardInfo, ShardInfo | None, float]:
        t0 = time.perf_counter()
        table = Artifact(in_uri).read_shard(index, columns)
        out, rejects = self.fn(table)
        name = shard_name(index)
        rinfo = None
        if rejects is not None:
            # Rejects first: the main shard's marker is what says "this shard is done".
            rinfo = ShardedWriter(join(out_uri, REJECTS)).write_shard(name, rejects)
        info = ShardedWriter(out_uri).write_shard(name, out)
        return info, rinfo, time.perf_counter() - t0


def sharded_claim_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str] | None) -> dict[str, Any]:
    """What run_sharded claims its output for by default: the stage, its settings and input digests."""
    return {"stage": stage, "config": dict(config), "inputs": dict(inputs or {})}


def run_sharded(
    in_uri: str,
    out_uri: str,
    factory: ProcessorFactory,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str] | None = None,
    pool: PoolConfig = PoolConfig(),
    columns: list[str] | None = None,
    with_rejects: bool = False,
    rejects_schema: pa.Schema | None = None,
    on_shard: Callable[[int, ShardInfo, int], None] | None = None,
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    claim_key: Mapping[str, Any] | None = None,
) -> Manifest:
    """Process every shard of ``in_uri`` not yet in ``out_uri`` and commit ``out_uri``.

    ``out_uri`` is claimed for (``stage``, ``config``, ``inputs``), or ``claim_key`` when given
    (storage.artifact.claim): finished by the same computation, it is returned as is; a folder
    holding another computation's shards is refused, never mixed with.

    ``on_shard(index, info, rejected_rows)`` is called on the driver as shards finish (progress).
    ``extra`` (or ``extra()``, evaluated once every shard is written) goes into the manifest.
    Requires ray to be initialised (see workers.cluster.connect).
    """
    finished = claim(out_uri, claim_key if claim_key is not None else sharded_claim_key(stage, config, inputs))
    if finished is not None:
        return finished
    src = Artifact(in_uri)
    writer = ShardedWriter(out_uri)
    reopen(join(out_uri, REJECTS))
    names = [shard_name(i) for i in range(src.num_shards)]
    done = writer.done()
    todo = [i for i, n in enumerate(names) if n not in done]
    if done:
        log.info("%s: %d of %d shards already done, resuming", stage, len(done), len(names))
    from workers.cluster import require_resources

    n_actors = max(1, min(pool.num_actors, len(todo) or 1))
    # Every actor is handed shards: one that can never start would hold its shard, and the stage, forever.
    require_resources({"CPU": pool.num_cpus, "GPU": pool.num_gpus}, n_actors, f"{stage} ({n_actors} actors)",
                      pool.wait_s)
    actor_opts = dict(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=-1, max_task_retries=3)
    actors = [ShardActor.options(**actor_opts).remote(factory) for _ in range(n_actors)]
    attempts: dict[int, int] = {}
    inflight: dict[ray.ObjectRef, tuple[int, Any]] = {}
    idle = list(actors)
    queue = list(todo)
    try:
        while queue or inflight:
            while queue and idle:
                i = queue.pop(0)
                actor = idle.pop()
                ref = actor.process.remote(in_uri, i, out_uri, columns)
                inflight[ref] = (i, actor)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            i, actor = inflight.pop(ref)
            try:
                info, rinfo, _secs = ray.get(ref)
            except (RayTaskError, RayActorError) as e:
                attempts[i] = attempts.get(i, 0) + 1
                if attempts[i] > pool.max_retries:
                    raise ShardFailedError(f"{stage}: shard {i} of {in_uri} failed {attempts[i]} times: {e}") from e
                log.warning("%s: shard %d failed (attempt %d), retrying: %s", stage, i, attempts[i], e)
                queue.append(i)
                if isinstance(e, RayActorError):
                    # The dead actor must not restart behind our back: it would hold its GPU while the
                    # replacement waits for one, which hangs a node whose GPUs are all in use.
                    ray.kill(actor, no_restart=True)
                    actor = ShardActor.options(**actor_opts).remote(factory)
                    actors.append(actor)  # so the finally below ends it too
                idle.append(actor)
                continue
            idle.append(actor)
            if on_shard is not None:
                on_shard(i, info, rinfo.rows if rinfo else 0)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    rejected = 0
    if with_rejects:
        rw = ShardedWriter(join(out_uri, REJECTS))
        rdone = rw.done()
        for n in names:  # shards finished before rejects were tracked, or with none: write empty
            if n not in rdone:
                rw.write_shard(n, (rejects_schema or pa.schema([("id", pa.string()), ("reason", pa.string())])).empty_table())
        rejected = rw.commit(f"{stage}.rejects", config, inputs, names).rows
    ex = dict((extra() if callable(extra) else extra) or {})
    if with_rejects:
        ex["rejects"] = rejected
    return writer.commit(stage, config, inputs, names, ex)
