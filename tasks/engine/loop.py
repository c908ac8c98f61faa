"""The training loop of every method: epochs of steps, schedule, AMP, guard, resume, checkpoint.

Run as one of N data-parallel workers (a torch.distributed process group, workers/train.py), each worker
trains on its slice of every batch and worker 0 alone writes (tasks.engine.distributed).

Layout of ``out_uri`` (local path or fsspec URI), the same for every method:

* ``last.pt``: after every epoch, atomically: the method's state, every optimiser, the AMP scaler, the
  history and the run's fingerprint (tasks.engine.resume). A rerun continues from it.
* ``metrics.json``: final metrics, per-epoch history, config and inputs, written when training ends.
* ``model.pt`` + ``model.json``: the checkpoint (tasks.engine.checkpoint), written last: model.json's
  presence marks a finished run, and a finished run with the same fingerprint is returned, not redone.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tasks.device import resolve_device
from tasks.engine.checkpoint import (
    META_FILE,
    _fs,
    atomic_write_bytes,
    dumps_json,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from tasks.engine.distributed import (
    World,
    average_buffers,
    average_gradients,
    average_scalars,
    barrier,
    broadcast_modules,
    current_world,
    leading_size,
    shard_batch,
    sum_int,
)
from tasks.engine.method import Method
from tasks.engine.resume import RUNTIME_FIELDS, check_same_run, fingerprint
from tasks.engine.schedule import Schedule
from tasks.engine.seeding import generator, seed_epoch, seed_for

METRICS_FILE = "metrics.json"
Progress = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    out_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    reused: bool = False  # a finished run with the same fingerprint was found and returned


class StepContext:
    """What a method's code sees of the engine: device, AMP, the position, seeded generators, stepping."""

    def __init__(self, device: torch.device, seed: int, amp: bool, clip_grad_norm: float | None, epochs: int,
                 world: World | None = None):
        self.device = device
        self.world = world or World()  # this worker's rank and the worker count (tasks.engine.distributed)
        self.seed = seed
        self.amp = amp
        self.channels_last = device.type == "cuda"
        self.clip_grad_norm = clip_grad_norm
        self.epochs = epochs
        self.epoch = 0  # 0-based index of the running epoch
        self.step = 0  # 0-based step within the epoch
        self.global_step = 0  # parameter updates so far, over the whole run
        self.steps_per_epoch = 1
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        self.modules: list[nn.Module] = []  # the networks passed to prepare (synchronised across workers)
        self._plan: _Plan | None = None  # set by fit
        self._method: Method | None = None

    def generator(self, purpose: int, *more: int) -> torch.Generator:
        """A generator for this epoch and ``purpose`` (tasks.engine.seeding): resume replays it exactly.

        The same on every worker: draw from it what decides the whole batch (order, pairing)."""
        return generator(self.seed, self.epoch, purpose, *more)

    def sample_generator(self, purpose: int, *more: int) -> torch.Generator:
        """A generator for per-sample randomness of this worker's slice (flips, erasing): with one worker it
        is :meth:`generator`; with several, each worker draws its own, as one worker would over the batch."""
        if self.world.size == 1:
            return self.generator(purpose, *more)
        return generator(self.seed, self.epoch, purpose, *more, 1_000_003 + self.world.rank)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a network to the device (channels_last on CUDA); a trained network is kept in step across
        workers from here on."""
        if not any(m is module for m in self.modules):
            self.modules.append(module)
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        """fp16 autocast on CUDA when AMP is on, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()

    def train_epoch(self, epoch: int, phase: str = "trial") -> dict[str, Any]:
        """Run the steps of ``epoch`` now, exactly as the loop would (same batches, rates, guard), without
        recording or checkpointing it: for trial rounds (featloss's adaptive weighting trains a round from a
        snapshot per candidate, then restores the snapshot). The global step is restored afterwards."""
        position = (self.epoch, self.global_step)
        try:
            return _train_epoch(self._method, self, epoch, self._plan, phase=phase)
        finally:
            self.epoch, self.global_step = position

    def backward_step(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        """zero_grad, (scaled) backward, optional clipping, step, for ``optimizers`` on ``loss``."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.world.size > 1:
            average_gradients(optimizers, self.world)
        if self.clip_grad_norm:
            for opt in optimizers:
                self.scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()


def _set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    lr = 0.0
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * factor
            lr = lr or g["lr"]
    return lr


def _finite_or_raise(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss diverged ({value} {where}); lower the learning rate or check "
                                 "the data")


def _too_many_epochs(out_uri: str, held: int, asked: int) -> ValueError:
    return ValueError(f"{out_uri} already holds {held} epochs, more than the {asked} asked; use another output "
                      "folder or --no-resume")


def finished_run(out_uri: str, wanted: Mapping[str, Any], epochs: int) -> FitResult | None:
    """The finished run in ``out_uri`` when its fingerprint is ``wanted`` and it has ``epochs`` epochs; None
    when there is none (or it has fewer epochs: the caller extends it from last.pt). A finished run of
    another config or data is refused (ResumeMismatch), never overwritten silently."""
    fs, path = _fs(out_uri)
    if not (fs.exists(f"{path}/{META_FILE}") and fs.exists(f"{path}/{METRICS_FILE}")):
        return None
    saved = json.loads(fs.cat_file(f"{path}/{METRICS_FILE}").decode())
    if "fingerprint" not in saved:
        return None  # written before the engine: its last.pt decides (and refuses) below
    check_same_run(saved["fingerprint"], wanted, out_uri)
    held = int(saved.get("epochs", epochs))
    if held > epochs:
        raise _too_many_epochs(out_uri, held, epochs)
    if held < epochs:
        return None
    return FitResult(out_uri, saved["final"], saved["history"], saved.get("resumed_from_epoch", 0), reused=True)


def fit(
    method: Method,
    out_uri: str,
    *,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    epochs: int,
    schedule: Schedule,
    seed: int = 0,
    device: str | torch.device = "auto",
    amp: bool = True,
    clip_grad_norm: float | None = None,
    max_steps: int | None = None,
    log_every: int = 10,
    resume: bool = True,
    progress: Progress | None = None,
    runtime_fields: frozenset[str] = RUNTIME_FIELDS,
) -> FitResult:
    """Train ``method`` for ``epochs`` epochs, or for ``max_steps`` updates (then ``epochs`` is ignored), into
    ``out_uri``.

    ``config`` is the method's whole config (recorded, and compared on resume apart from
    ``runtime_fields``); ``inputs`` maps a name to the digest of every table and init checkpoint the
    run reads. ``progress`` receives {"event": "step", ...} every ``log_every`` steps and
    {"event": "epoch", ...} (the epoch's record) after each epoch.
    """
    out_uri = out_uri.rstrip("/")
    world = current_world()
    if world.size > 1 and not method.data_parallel:
        raise ValueError(f"method {method.name} does not train data-parallel (workers > 1): its steps couple the "
                         "samples of a batch or keep per-sample state, which splitting batches over workers would "
                         "change; set workers: 1 in its section")
    # With a schedule that does not depend on the run's length, a finished run can be extended: its
    # epoch count is then not part of what must match.
    extendable = max_steps is None and schedule.kind != "cosine" and method.extendable
    wanted = fingerprint({k: v for k, v in config.items() if not (extendable and k == "epochs")}, inputs,
                         runtime_fields)
    saved = load_training_state(out_uri) if resume else None
    if saved is not None:
        check_same_run(saved.get("fingerprint", {}), wanted, out_uri)
        if int(saved["epoch"]) > epochs:
            raise _too_many_epochs(out_uri, int(saved["epoch"]), epochs)
    if resume and (done := finished_run(out_uri, wanted, epochs)) is not None:
        return done
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    ctx = StepContext(dev, seed, amp and dev.type == "cuda", clip_grad_norm, epochs, world)
    torch.manual_seed(seed_for(seed, -1))  # network initialisation
    method.setup(ctx)
    ctx.steps_per_epoch = max(1, method.steps_per_epoch())
    # Without max_steps an epoch is whatever its batches are (a streamed epoch's count can vary by one or
    # two around steps_per_epoch); with it, training stops at that many updates.
    total_steps = max_steps if max_steps is not None else math.inf
    n_epochs = epochs if max_steps is None else math.ceil(max_steps / ctx.steps_per_epoch)
    total_units = n_epochs if schedule.unit == "epoch" else (
        max_steps if max_steps is not None else epochs * ctx.steps_per_epoch)

    history: list[dict[str, Any]] = []
    start = 0
    if saved is not None:
        method.load_state_dict(saved["method"])
        for opt, st in zip(method.optimizers, saved["optimizers"]):
            opt.load_state_dict(st)
        if saved.get("scaler"):
            ctx.scaler.load_state_dict(saved["scaler"])
        history = list(saved["history"])
        start = int(saved["epoch"])
        ctx.global_step = int(saved["global_step"])
    if world.size > 1:
        broadcast_modules(ctx.modules)
    # A model.json of an earlier run must not pass for this one while it trains.
    fs, path = _fs(out_uri)
    if world.primary and fs.exists(f"{path}/{META_FILE}"):
        fs.rm(f"{path}/{META_FILE}")

    ctx._plan = _Plan(n_epochs, total_steps, total_units, schedule, log_every, progress if world.primary else None)
    ctx._method = method
    try:
        _run_epochs(method, ctx, out_uri, history, start, ctx._plan, wanted)
    finally:
        method.teardown(ctx)
    if world.primary:
        result = _finish(method, ctx, out_uri, history, saved, config, inputs, wanted, epochs)
    else:  # worker 0 writes the run's files; the others hold the same model
        result = FitResult(out_uri, dict(history[-1]) if history else {}, history,
                           int(saved["epoch"]) if saved is not None else 0)
    if world.size > 1:
        barrier()  # every worker returns once worker 0's checkpoint is written
    return result


@dataclass
class _Plan:
    """The fixed facts of one fit: what the step loop needs besides the method and the context."""

    n_epochs: int
    total_steps: float  # math.inf without max_steps
    total_units: float  # the schedule's length in its own unit
    schedule: Schedule
    log_every: int
    progress: Progress | None


def _train_epoch(method: Method, ctx: StepContext, epoch: int, plan: _Plan, *, phase: str = "train",
                 ) -> dict[str, Any]:
    """The steps of ``epoch`` (0-based): schedule, autocast, the method's step, stepping, the guard.
    Returns the epoch's mean step outputs, lr, steps, samples, seconds and images/s."""
    ctx.epoch, ctx.step = epoch, 0
    seed_epoch(ctx.seed, epoch)
    sums: dict[str, torch.Tensor | float] = {}
    counts: dict[str, int] = {}
    samples = steps = 0
    lr = 0.0
    t0 = time.perf_counter()
    world = ctx.world
    for s, batch in enumerate(method.batches(epoch, ctx)):
        if ctx.global_step >= plan.total_steps:
            break
        if world.size > 1:
            # Every worker sees the same batch; one too small to give each worker two samples (batch
            # norm) is skipped by all of them alike.
            n = leading_size(batch)
            if n is not None and n < 2 * world.size:
                continue
            batch = shard_batch(batch, world)
        ctx.step = s
        pos = (epoch + (s + 0.5) / ctx.steps_per_epoch if plan.schedule.unit == "epoch"
               else ctx.global_step + 0.5)
        lr = _set_lr(method.optimizers, plan.schedule.factor(pos, plan.total_units))
        with ctx.autocast():
            out = method.training_step(batch, ctx)
        if method.automatic_optimization:
            ctx.backward_step(out["loss"], method.optimizers)
        ctx.global_step += 1
        steps += 1
        samples += int(out.get("samples", 0))
        for k, v in out.items():
            if k != "samples":
                sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))
                counts[k] = counts.get(k, 0) + 1  # a key some steps leave out is averaged over the others
        if plan.progress is not None and (steps % plan.log_every == 0 or steps == 1):
            running = {k: float(v) / counts[k] for k, v in sums.items()}  # one device sync per log point
            _finite_or_raise(running.get("loss", 0.0), f"by epoch {epoch + 1}, step {steps}")
            el = time.perf_counter() - t0
            plan.progress({"event": "step", **running, "phase": phase, "epoch": epoch + 1, "epochs": plan.n_epochs,
                           "step": steps, "steps": ctx.steps_per_epoch, "global_step": ctx.global_step, "lr": lr,
                           "images_per_s": samples / el if el > 0 else 0.0})
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    if steps == 0:
        raise ValueError(f"epoch {epoch + 1} has no training batch; the training data is empty or smaller than "
                         "one batch")
    seconds = time.perf_counter() - t0
    means = {k: float(v) / counts[k] for k, v in sums.items()}
    if world.size > 1:  # the epoch's record is over the whole batches, not worker 0's slices
        means = average_scalars(means, world, ctx.device)
        samples = sum_int(samples, ctx.device)
    _finite_or_raise(means.get("loss", 0.0), f"in epoch {epoch + 1}")
    return {**means, "lr": lr, "steps": steps, "samples": samples, "seconds": seconds,
            "images_per_s": samples / seconds if seconds > 0 else 0.0}


def _run_epochs(method: Method, ctx: StepContext, out_uri: str, history: list[dict[str, Any]], start: int,
                plan: _Plan, wanted: Mapping[str, Any]) -> None:
    for epoch in range(start, plan.n_epochs):
        ctx.epoch = epoch
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"epoch": epoch + 1, "epochs": plan.n_epochs}
        rec.update(method.on_epoch_start(epoch, ctx) or {})
        rec.update(_train_epoch(method, ctx, epoch, plan))
        if ctx.world.size > 1:
            average_buffers(ctx.modules, ctx.world)
        rec.update(method.on_epoch_end(epoch, ctx) or {})
        rec.update(method.validate(ctx) or {})
        # "seconds" is the epoch's wall time, hooks (trial rounds) and validation included; images_per_s is
        # over the steps alone.
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        if not ctx.world.primary:
            if ctx.global_step >= plan.total_steps:
                break
            continue
        save_training_state(out_uri, {
            "epoch": epoch + 1, "global_step": ctx.global_step, "method": method.state_dict(),
            "optimizers": [o.state_dict() for o in method.optimizers], "scaler": ctx.scaler.state_dict(),
            "history": history, "fingerprint": wanted,
        })
        if plan.progress is not None:
            plan.progress({"event": "epoch", **rec})
        if ctx.global_step >= plan.total_steps:
            break


def _finish(method: Method, ctx: StepContext, out_uri: str, history: list[dict[str, Any]], saved: Mapping | None,
            config: Mapping[str, Any], inputs: Mapping[str, str], wanted: Mapping[str, Any], epochs: int,
            ) -> FitResult:
    dev = ctx.device
    final = method.final_metrics(history, ctx)
    final.setdefault("device", str(dev))
    final.setdefault("amp", ctx.amp)
    final.setdefault("train_seconds", sum(h["seconds"] for h in history))
    resumed = int(saved["epoch"]) if saved is not None else 0
    module, meta = method.export(ctx)
    # metrics.json also carries what the method says about the run (train tables, teacher, init...).
    facts = {k: v for k, v in meta.items() if k not in ("model", "classes", "mean", "std")}
    atomic_write_bytes(f"{out_uri}/{METRICS_FILE}", dumps_json({
        **facts, "method": method.name, "epochs": epochs, "final": final, "history": history,
        "config": dict(config), "inputs": dict(inputs), "resumed_from_epoch": resumed,
        "fingerprint": wanted}).encode())
    save_checkpoint(out_uri, module, {"method": method.name, "metrics": final, "config": dict(config),
                                      "inputs": dict(inputs), **meta})
    return FitResult(out_uri, final, history, resumed)
