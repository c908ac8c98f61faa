"""Place a stage's computation on a Ray worker that has the resources it declares.

The flow process only orchestrates: a compute stage (training, distillation, centroids, evaluation, a
figure that runs a model) is one Ray task with the stage's CPUs, GPUs and memory, so a Prefect worker
without a GPU drives a GPU cluster and independent stages share the cluster as its resources allow.
The stage's identity, reuse and record stay with the caller (flows/stage.py); the task only computes
into the stage's output folder, which must be storage every node reaches (a local path on one
machine, a shared file system or an object store on a cluster).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import ray


@dataclass(frozen=True)
class Resources:
    """What one compute stage asks Ray for."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None  # None: no reservation (Ray's default)

    def need(self) -> dict[str, float]:
        """The request as Ray resource names (what workers.cluster.require_resources checks)."""
        out = {"CPU": self.cpus, "GPU": self.gpus}
        if self.memory_gb:
            out["memory"] = self.memory_gb * 2**30
        return out

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * 2**30)
        return opts


@dataclass(frozen=True)
class Placement:
    """Where a stage ran: host, Ray node, device, process, and when."""

    host: str
    node_id: str | None
    device: str  # "cpu", "cuda:N (<name>)", or "driver" for orchestration-only stages
    pid: int
    started: float
    finished: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def where(device: str) -> dict[str, Any]:
    """This process's host, Ray node id (None without Ray) and pid."""
    node = None
    if ray.is_initialized():
        try:
            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - a driver that lost its cluster still records its host
            node = None
    return {"host": socket.gethostname(), "node_id": node, "device": device, "pid": os.getpid()}


def _device_name(gpus: float) -> str:
    """The device a task's torch code gets: the first GPU Ray assigned it (with its name), else CPU."""
    if gpus <= 0:
        return "cpu"
    import torch

    ids = ray.get_gpu_ids()
    if not ids or not torch.cuda.is_available():
        return "cpu"  # a logical GPU (a CPU test cluster declaring --num-gpus) computes on the CPU
    return f"cuda:0 ({torch.cuda.get_device_name(0)})"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU


@contextmanager
def stage_log(path: str | None) -> Iterator[None]:
    """Append the stage body's progress lines (logger ``fermine``: epochs, shards) to the run's log file
    ``path``, as the flow process does for its own: a Ray worker's log is not where a user looks. A node
    that cannot open the file (no shared run folder) computes without it."""
    handler = None
    if path:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            handler = None
    if handler is None:
        yield
        return
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s [{socket.gethostname()} pid %(process)d]: %(message)s"))
    logger = logging.getLogger("fermine")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)  # Ray reuses the worker process for other tasks
        logger.setLevel(level)
        handler.close()


@ray.remote(max_retries=0)  # a failed stage is retried by the flow (same folder, finished work kept)
def _compute(fn: Callable[[str], Any], out: str, cpus: float, gpus: float, log_file: str | None) -> dict[str, Any]:
    import torch

    # Ray sets OMP_NUM_THREADS from the task's CPUs; torch is told too, so a stage computes with the same
    # number of threads on every node and the numbers repeat.
    torch.set_num_threads(max(1, int(cpus)))
    started = time.time()
    with stage_log(log_file):
        fn(out)
    return {**where(_device_name(gpus)), "started": started, "finished": time.time()}


def run_placed(fn: Callable[[str], Any], out: str, res: Resources, log_file: str | None = None,
               wait_s: float = 0.0) -> Placement:
    """Run ``fn(out)`` as a Ray task with ``res`` (Ray must be connected); wait; return where it ran.

    A request no node can hold is refused (after ``wait_s`` seconds for nodes to join) instead of queued
    forever. ``log_file``: the run's log, where the body's progress lines go (stage_log). An exception
    raised by ``fn`` is raised here as itself (Ray's wrapper is removed), so user errors keep their type
    and message.
    """
    from workers.cluster import require_resources

    require_resources(res.need(), 1, f"stage {os.path.basename(out.rstrip('/'))}", wait_s)
    ref = _compute.options(**res.ray_options()).remote(fn, out, res.cpus, res.gpus, log_file)
    try:
        return Placement(**ray.get(ref))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


__all__ = ["Placement", "Resources", "run_placed", "stage_log", "where"]
