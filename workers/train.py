"""Data-parallel training on Ray Train: one stage body on N workers (``TorchTrainer``).

Ray Train starts the workers (each with the stage's CPUs and GPU), sets up the torch.distributed
process group (gloo on CPU, NCCL on GPU) and restarts the whole group when a worker dies. Every worker
runs the same stage body into the same output folder; the engine (tasks.engine.distributed) slices the
batches, averages the gradients and lets worker 0 write. The checkpoints are the engine's own
``last.pt`` in the stage's folder, not Ray Train's: a restarted group (or a rerun of the stage) resumes
from the last finished epoch by the engine's one resume rule. The stage folder and the run folder must
be storage every node reaches, as for any placed stage.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import fsspec
import ray

from workers.placement import Placement, Resources, stage_log, where

# Restarts of the worker group after a worker died (killed, out of memory, node lost) before the stage
# fails; each restart resumes from last.pt.
MAX_FAILURES = 3


def _device(gpus: float) -> str:
    import torch

    if gpus > 0 and torch.cuda.is_available():
        i = torch.cuda.current_device()
        return f"cuda:{i} ({torch.cuda.get_device_name(i)})"
    return "cpu"


def _storage(out: str) -> tuple[str, str]:
    """(storage_path, name) for Ray Train's own run state: beside the stage folder, in the run folder, so
    the stage folder holds only the stage's output."""
    parent, name = os.path.split(out.rstrip("/"))
    if "://" not in parent:
        parent = os.path.abspath(parent or ".")
    return f"{parent}/.ray_train", name


def run_data_parallel(fn: Callable[[str], Any], out: str, workers: int, res: Resources,
                      max_failures: int = MAX_FAILURES, log_file: str | None = None, wait_s: float = 0.0,
                      ) -> Placement:
    """Run ``fn(out)`` on ``workers`` Ray Train workers with ``res`` each (Ray must be connected); wait.

    Returns where worker 0 ran (its device string says how many workers). Workers the cluster cannot hold
    are refused (after ``wait_s`` seconds for nodes to join). ``log_file``: the run's log, where worker 0's
    progress lines go. An exception raised by ``fn`` is raised here as itself, once Ray
    Train has given up on the group.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from workers.cluster import require_resources

    require_resources(res.need(), workers, f"stage {os.path.basename(out.rstrip('/'))} (data-parallel)", wait_s)
    use_gpu = res.gpus > 0
    per_worker: dict[str, float] = {"CPU": res.cpus}
    if use_gpu:
        per_worker["GPU"] = res.gpus
    if res.memory_gb:
        per_worker["memory"] = res.memory_gb * 2**30
    cpus = res.cpus

    def loop() -> None:
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # as a placed stage: the same threads on every node
        if use_gpu and torch.cuda.is_available():
            torch.cuda.set_device(ray.train.torch.get_device())
        started = time.time()
        primary = ray.train.get_context().get_world_rank() == 0
        with stage_log(log_file if primary else None):
            fn(out)
        if primary:  # where worker 0 ran, for the stage record
            here = where(f"{_device(res.gpus)} x{workers} (DDP)")
            with fsspec.open(placement_file, "w") as f:
                json.dump({**here, "started": started, "finished": time.time()}, f)

    storage, name = _storage(out)
    placement_file = f"{storage}/{name}/placement.json"
    fs, path = fsspec.core.url_to_fs(placement_file)
    if fs.exists(path):  # an earlier attempt's: never mistaken for this one's
        fs.rm(path)
    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as e:
        raise _cause(e, list(e.worker_failures.values())) from None
    except ControllerError as e:
        raise _cause(e, [e.controller_failure]) from None
    del result  # Ray Train's result holds no checkpoint of ours: the stage's files are in ``out``
    with fsspec.open(placement_file) as f:
        return Placement(**json.load(f))


def _cause(err: Exception, failures: list[Exception]) -> Exception:
    """The user's exception behind Ray's wrappers (the first worker's), else Ray's own error."""
    for f in failures:
        cause = getattr(f, "cause", None)
        if isinstance(cause, Exception):
            return cause
        if isinstance(f, Exception) and not isinstance(f, ray.exceptions.RayError):
            return f
    return err


__all__ = ["MAX_FAILURES", "run_data_parallel"]
