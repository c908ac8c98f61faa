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

    def __call__(self, fn: Callable[[str], Any], out: str) -> dict[str, Any]:
        from flows.steps import connect_ray
        from workers.placement import Resources, run_placed

        connect_ray(self.section)
        s = self.section
        res = Resources(cpus=s.cpus_per_worker, gpus=s.gpus_per_worker, memory_gb=s.memory_gb_per_worker)
        return run_placed(fn, out, res).to_dict()


def placer_for(section: RaySection) -> RayPlacer | None:
    """The run's placer: None when compute stays in the flow's process (``ray.place_compute: false``)."""
    return RayPlacer(section) if section.place_compute else None
