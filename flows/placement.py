"""Where a run's compute stages go: Ray tasks with the run config's per-worker resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flows.config import RaySection


@dataclass(frozen=True)
class RayPlacer:
    """A flows.stage.Placer: runs a stage body on a Ray worker with ``ray.cpus_per_worker``,
    ``gpus_per_worker`` and ``memory_gb_per_worker`` (workers.placement), connecting to the run's Ray
    (a private local instance by default, or ``ray.address``) on first use."""

    section: RaySection

    def __call__(self, fn: Callable[[str], Any], out: str, workers: int = 1) -> dict[str, Any]:
        """``workers`` > 1: a data-parallel training on that many Ray Train workers (workers/train.py)."""
        import os

        from flows.console import run_log_path
        from flows.steps import connect_ray
        from workers.placement import Resources, run_placed

        s = self.section
        log_file = run_log_path(os.path.dirname(out.rstrip("/")))  # stage folders sit in the run folder
        res = Resources(cpus=s.cpus_per_worker, gpus=s.gpus_per_worker, memory_gb=s.memory_gb_per_worker)
        if workers > 1:
            from workers.train import run_data_parallel

            connect_ray(s)
            return run_data_parallel(fn, out, workers, res, log_file=log_file,
                                     wait_s=s.wait_for_resources_s).to_dict()
        connect_ray(s)
        return run_placed(fn, out, res, log_file=log_file, wait_s=s.wait_for_resources_s).to_dict()


def placer_for(section: RaySection) -> RayPlacer | None:
    """The run's placer: None when compute stays in the flow's process (``ray.place_compute: false``)."""
    return RayPlacer(section) if section.place_compute else None
