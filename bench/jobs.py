"""A bench's independent jobs as child processes, several at once, each with its share of the CPUs.

On a small machine one training process does not use its cores fully (small batches, Python between the
steps): two one-thread processes here train about 1.3x as many batches as one two-thread process. Each
job is a child process of its own (its own Prefect server, Ray instance and torch threads), so jobs share
nothing but the run folders they name. A job's numbers depend on its thread count (CPU reductions), so the
same ``parallel`` on the same machine repeats them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Job:
    """One child process: ``argv`` after the interpreter (a script and its arguments); the child is also
    given ``--threads N --figures PATH`` and writes its figures (JSON) to PATH."""

    name: str  # names its log, <out>/logs/<name>.log, and its figures file, <out>/jobs/<name>.json
    argv: list[str] = field(default_factory=list)
    minutes: float = 1.0  # about how long it takes (orders the jobs, longest first)


def threads_per_job(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


def run_child(job: Job, out: str, threads: int) -> tuple[Any, float]:
    """Run ``job`` to its end; returns (its figures, seconds). Raises RuntimeError quoting its log's end."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.makedirs(os.path.join(out, "jobs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"{job.name}.log")
    fig_path = os.path.join(out, "jobs", f"{job.name}.json")
    if os.path.exists(fig_path):
        os.remove(fig_path)  # an earlier run's figures must not stand in for this run's
    cmd = [sys.executable, *job.argv, "--threads", str(threads), "--figures", fig_path]
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    t = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not os.path.exists(fig_path):
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"{job.name} failed (exit {rc}); its log {log_path} ends:\n{tail}")
    with open(fig_path) as f:
        return json.load(f), time.time() - t


def run_parallel(jobs: list[Job], out: str, parallel: int,
                 log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, float]]:
    """Every job, ``parallel`` at once (longest first), each with cores / parallel threads.

    Returns each job's figures and seconds by name. Every job runs to its end even when another fails (a
    rerun reuses the finished stages); the failures are then raised together (SystemExit, their logs' ends).
    """
    threads = threads_per_job(parallel)
    figures: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    failures: list[str] = []
    log(f"{len(jobs)} jobs, {parallel} at once, {threads} thread(s) each; logs in {os.path.join(out, 'logs')}")

    def one(job: Job) -> None:
        try:
            figures[job.name], seconds[job.name] = run_child(job, out, threads)
        except RuntimeError as e:
            failures.append(str(e))
            log(f"{job.name}: FAILED")
            return
        log(f"{job.name}: {seconds[job.name]:.0f} s")

    with ThreadPoolExecutor(max_workers=parallel) as ex:
        list(ex.map(one, sorted(jobs, key=lambda j: -j.minutes)))
    if failures:
        raise SystemExit("\n\n".join(failures))
    return figures, seconds


def write_figures(path: str, figures: Any) -> None:
    """A child's side: its figures as JSON, written whole or not at all (the parent reads only a finished file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(figures, f, default=str)
    os.replace(tmp, path)
