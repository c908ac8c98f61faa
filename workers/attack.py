"""The PASM attack stage on Ray: actors hold the teacher (one GPU each, or CPU threads) and attack
one input shard per task.

Built on workers.sharded.run_sharded: each actor loads the teacher ONCE (the factory), measures its
best chunk size on its first shard, and writes each positions shard itself, atomically, under the
input shard's index. So a rerun after a crash or a killed worker attacks only the shards that are
not written yet, and no row is ever written twice. The driver sees only shard summaries.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from storage.artifact import Artifact, Manifest
from tasks.pasm.attack import ATTACK_STAGE as STAGE
from tasks.pasm.attack import REJECTS_TABLE_SCHEMA, AttackConfig, make_shard_processor, resume_guard, stage_config
from workers.cluster import RayConfig, connect
from workers.sharded import PoolConfig, default_pool, run_sharded

COLUMNS = ["id", "image", "label", "split"]


@dataclass(frozen=True)
class AttackRun:
    uri: str
    manifest: Manifest
    rows: int  # positions written (attacked images)
    rejected: int  # rows of the attacked splits that could not be attacked (see <uri>/rejects)
    seconds: float  # wall time of this call (0 when a finished artifact was reused)
    reused: bool
    pool: PoolConfig | None

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def attack_factory(checkpoint_uri: str, cfg: AttackConfig, threads: int | None = None):
    """Runs once per actor: the teacher goes to the actor's GPU when Ray gave it one, else the CPU."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from tasks.device import resolve_device

    # Ray hides GPUs from CPU-only actors, so "auto" means the GPU Ray gave this actor, if any;
    # an explicit device (e.g. --device cpu) is kept.
    return make_shard_processor(checkpoint_uri, cfg, str(resolve_device(cfg.device)))


def attack_artifact(checkpoint_uri: str, table_uri: str, out_uri: str, cfg: AttackConfig = AttackConfig(), *,
                    pool: PoolConfig | None = None,
                    on_shard: Callable[[int, Any, int], None] | None = None) -> Manifest:
    """The attack stage on an already connected Ray (flows call this with their pool settings).

    ``pool`` None = :func:`default_pool` for the connected cluster. Returns the positions Manifest.
    """
    src = Artifact(table_uri)
    config, inputs = stage_config(cfg, checkpoint_uri), {"table": src.digest}
    pool = pool or default_pool()
    threads = None if pool.num_gpus > 0 else max(1, int(pool.num_cpus))
    factory = functools.partial(attack_factory, checkpoint_uri, cfg, threads)
    return run_sharded(table_uri, out_uri, factory, stage=STAGE, config=config, inputs=inputs, pool=pool,
                       columns=COLUMNS, with_rejects=True, rejects_schema=REJECTS_TABLE_SCHEMA, on_shard=on_shard,
                       extra={"actors": pool.num_actors, "gpus_per_actor": pool.num_gpus})


def run_attack(
    checkpoint_uri: str,
    table_uri: str,
    out_uri: str,
    cfg: AttackConfig = AttackConfig(),
    *,
    ray_cfg: RayConfig | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    max_retries: int = 3,
    on_shard: Callable[[int, Any, int], None] | None = None,
) -> AttackRun:
    """Attack every labeled row of ``cfg.splits`` in ``table_uri``; positions table at ``out_uri``.

    Same output as tasks.pasm.attack.attack_table (POSITIONS_SCHEMA, rejects at ``<out>/rejects``), computed
    by a pool of Ray actors. Connects to ``ray_cfg`` (a local instance by default). Resumable; a
    finished artifact with the same settings is returned at once; one with other settings is refused.
    """
    src = Artifact(table_uri)
    finished = resume_guard(out_uri, stage_config(cfg, checkpoint_uri), {"table": src.digest})
    if finished is not None:
        return AttackRun(out_uri, finished, finished.rows, int(finished.extra.get("rejects", 0)), 0.0, True, None)
    connect(ray_cfg)
    pool = replace(default_pool(workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker), max_retries=max_retries)
    t0 = time.perf_counter()
    m = attack_artifact(checkpoint_uri, table_uri, out_uri, cfg, pool=pool, on_shard=on_shard)
    return AttackRun(out_uri, m, m.rows, int(m.extra.get("rejects", 0)), time.perf_counter() - t0, False, pool)

