"""Ray side of the ingest stage for sources with random access: parts of the entry list as Ray tasks.

The driver lists the source's entries once (storage.readers.Splittable.entries: the .idx's
(key, offset) pairs, a folder tree's file list, a csv's row offsets) and hands each task a slice
of ``part_size`` entries. Task ``i`` reads its slice, validates it as the one-process ingest does
(storage.ingest.write_part) and writes shard ``i`` of the image table and of its rejects, itself
and atomically, so:

* a rerun after a kill skips the parts whose shards are in place and redoes only the others;
* a task that fails is retried; a duplicate attempt rewrites the same files;
* the driver holds the entry list and small ShardInfo records, never images.

The output is a plain image table (rows, rejects and manifest extras as storage.ingest.write_image_table
writes them), read unchanged by align and train.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray
from ray.exceptions import RayError

from storage.artifact import Manifest, ShardInfo
from storage.ingest import begin_parts, commit_parts, done_parts, write_part
from storage.readers.base import Entries, Record
from workers.sharded import PoolConfig, ShardFailedError

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 4096  # entries per part: ~30 MB of 112 px JPEGs, a few seconds of one core

ReadEntries = Callable[[Entries], Iterator[Record]]


class PartFailedError(ShardFailedError):
    """A part kept failing after its retries; the message names the part, its entries and the last error."""


def part_count(entries: int, part_size: int) -> int:
    """Parts of ``part_size`` entries (the last one shorter); an empty source is one empty part."""
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    return max(1, math.ceil(entries / part_size))


def part_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str] | None, entries: Entries,
             part_size: int) -> dict[str, Any]:
    """What an output folder is claimed for: the settings, and the entry list and its cut into parts,
    since shard ``i`` holds entries ``i * part_size ...`` and only means that for the same list."""
    return {"stage": stage, "config": dict(config), "inputs": dict(inputs or {}), "part_size": part_size,
            "entries": len(entries), "entries_digest": entries.digest()}


@ray.remote
def _ingest_part(read_entries: ReadEntries, part: Entries, uri: str, index: int,
                 stage: str) -> tuple[ShardInfo, ShardInfo, float]:
    t0 = time.perf_counter()
    info, rinfo = write_part(read_entries(part), uri, index, stage=stage)
    return info, rinfo, time.perf_counter() - t0


def ingest_parts(
    read_entries: ReadEntries,
    entries: Entries,
    out_uri: str,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str] | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    pool: PoolConfig | None = None,
    on_part: Callable[[int, ShardInfo, int], None] | None = None,
) -> Manifest:
    """Ingest ``entries`` (read by ``read_entries``, see storage.readers.Splittable) into ``out_uri``.

    At most ``pool.num_actors`` parts (default PoolConfig(): 1) run at once, each a task with ``pool.num_cpus`` CPUs; a part
    that raises is retried up to ``pool.max_retries`` times, then PartFailedError. ``out_uri`` is
    claimed for (stage, config, inputs, entry list, part_size): finished by the same ingest it is
    returned as is, another computation's output is refused (FileExistsError), never mixed with.
    ``on_part(index, shard info, rejected)`` is called on the driver as parts finish (progress).
    Requires ray to be initialised (workers.cluster.connect). Tasks read the source themselves: on a
    cluster its files must be where every node sees them, at the same path.
    """
    pool = pool or PoolConfig()
    parts = part_count(len(entries), part_size)
    try:
        finished = begin_parts(out_uri, part_key(stage, config, inputs, entries, part_size))
    except FileExistsError as e:
        raise FileExistsError(f"{e} (an ingest in parts is compared by its settings, its part size and the "
                              f"{len(entries)} entries listed in its source now)") from None
    if finished is not None:
        return finished
    done = done_parts(out_uri, parts)
    if done:
        log.info("%s: %d of %d parts already done, resuming", stage, len(done), parts)
    _run(read_entries, entries, out_uri, [i for i in range(parts) if i not in done], stage=stage,
         part_size=part_size, pool=pool, on_part=on_part)
    return commit_parts(out_uri, parts, stage=stage, config=config, inputs=inputs)


def _run(read_entries: ReadEntries, entries: Entries, out_uri: str, todo: list[int], *, stage: str,
         part_size: int, pool: PoolConfig, on_part: Callable[[int, ShardInfo, int], None] | None) -> None:
    # Ray retries a task whose worker died (max_retries); exceptions come back here, to be retried
    # with a count and a message. The entry slices are made as parts are submitted, so the object
    # store holds a few of them, not a copy of the whole list.
    from workers.cluster import require_resources

    require_resources({"CPU": pool.num_cpus}, 1, f"{stage} (parts of {part_size} entries)", pool.wait_s)
    task = _ingest_part.options(num_cpus=pool.num_cpus, max_retries=3, retry_exceptions=False)
    queue, attempts = deque(todo), dict.fromkeys(todo, 0)
    inflight: dict[ray.ObjectRef, int] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < max(1, pool.num_actors):
                i = queue.popleft()
                inflight[task.remote(read_entries, entries[i * part_size:(i + 1) * part_size], out_uri, i, stage)] = i
            ready, _ = ray.wait(list(inflight), num_returns=1)
            i = inflight.pop(ready[0])
            try:
                info, rinfo, _secs = ray.get(ready[0])
            except RayError as e:
                attempts[i] += 1
                if attempts[i] > pool.max_retries:
                    raise PartFailedError(_failure(stage, i, part_size, len(entries), attempts[i], e)) from e
                log.warning("%s: part %d failed (attempt %d), retrying: %s", stage, i, attempts[i], _cause(e))
                queue.append(i)
                continue
            if on_part is not None:
                on_part(i, info, rinfo.rows)
    finally:
        for ref in inflight:  # on an error: stop the other parts (what they wrote is kept or redone)
            ray.cancel(ref)


def _cause(e: RayError) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def _failure(stage: str, i: int, part_size: int, n: int, attempts: int, e: RayError) -> str:
    first, last = i * part_size, min(n, (i + 1) * part_size) - 1
    return (f"{stage}: part {i} (entries {first}..{last}) failed {attempts} times; last error: {_cause(e)}. "
            "Fix its cause and rerun: finished parts are kept. The Ray workers read the source "
            "themselves: on a cluster it must be on storage every node mounts at the same path.")
