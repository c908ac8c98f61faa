"""Prefect task wrappers: every stage runs through ``Run.stage`` inside one Prefect task.

Prefect sees tasks, states, retries and durations; resume rests on our stage records, not on
Prefect's pickled results (SPEC.md, Artifacts), so Prefect caching and result persistence are
off and a task returns only the small StageRecord.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.stage import Placer, Run, StageRecord


def _workers(name: str, config: Any, fn: Callable[[str], Any]) -> int:
    """The data-parallel workers a compute stage asks for: its body's ``workers`` (flows.steps.train and
    student, the supervised trainings); any other stage whose config asks for more than one is refused."""
    if hasattr(fn, "workers"):
        return int(fn.workers)
    asked = int(getattr(config, "workers", 1) or 1)
    if asked > 1:
        raise ValueError(f"{name}: workers: {asked} is for the supervised trainings (teacher, PASM students, "
                         "retraining); this stage trains on one worker: set its workers: 1")
    return 1


@task(cache_policy=NO_CACHE, persist_result=False)
def _stage_task(run_root: str, name: str, config: Any, inputs: Mapping[str, str], fn: Callable[[str], Any],
                placer: Placer | None = None) -> StageRecord:
    return Run(run_root).stage(name, config, inputs, fn, placer)


def stage(
    run: Run,
    name: str,
    config: Any,
    inputs: Mapping[str, str],
    fn: Callable[[str], Any],
    *,
    ray: bool = False,
    retries: int = 2,
    compute: bool = False,
) -> StageRecord:
    """Run one stage as a Prefect task; stages that talk to Ray retry with backoff.

    ``compute``: the stage computes (trains, distils, evaluates, draws with a model), so it runs where
    the run places compute (``run.placer``: a Ray worker with the stage's resources), not in this
    process. A retry lands in the same output folder, so work finished by the failed attempt is kept.
    """
    opts: dict[str, Any] = {"name": name, "task_run_name": name}
    if ray:
        opts.update(retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
    placer = run.placer if compute else None
    workers = _workers(name, config, fn) if compute else 1
    if workers > 1:
        if placer is None:
            raise ValueError(f"{name}: workers: {workers} trains on Ray Train workers; set ray.place_compute: true "
                             "(or workers: 1)")
        placer = partial(placer, workers=workers)
    return _stage_task.with_options(**opts)(run.root, name, config, inputs, fn, placer)
