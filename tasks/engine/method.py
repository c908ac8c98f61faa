"""What a method plugs into the engine (LightningModule's role; :func:`tasks.engine.fit` is the Trainer).

A method holds its networks, optimisers and method state (PT's filter records, featloss's centres and
weights); the engine never looks inside. Subclass and override what the method needs: ``setup``,
``batches``, ``training_step`` and ``export`` are required, the hooks default to doing nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from tasks.engine.loop import StepContext


class Method:
    #: recorded as ``method`` in model.json
    name: str = "method"
    #: True: ``training_step`` returns {"loss": tensor} and the engine steps every optimiser on it.
    #: False: the step calls ``ctx.backward_step(loss, optimizers)`` itself, as often as it needs
    #: (CAF steps its critic and its encoder separately).
    automatic_optimization: bool = True
    #: True: a finished run may be continued to more epochs (schedules that do not depend on the run's
    #: length). False for methods whose math depends on the epoch count (PT's consistency ramp).
    extendable: bool = True
    #: True: the method trains data-parallel (``workers: N``, tasks.engine.distributed): its batches may be
    #: sliced over workers, it draws per-sample randomness from ``ctx.sample_generator`` and whole-batch
    #: randomness from ``ctx.generator``, keeps no per-sample state, and every worker takes the same
    #: steps. False (the default) refuses workers > 1.
    data_parallel: bool = False

    optimizers: list[torch.optim.Optimizer]

    def setup(self, ctx: "StepContext") -> None:
        """Build the networks on ``ctx.device`` (via ``ctx.prepare``) and set ``self.optimizers``."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        """Training steps in one epoch (for progress and iteration schedules)."""
        raise NotImplementedError

    def batches(self, epoch: int, ctx: "StepContext") -> Iterable[Any]:
        """The batches of ``epoch`` (0-based); draw randomness from ``ctx.generator(purpose)`` only."""
        raise NotImplementedError

    def training_step(self, batch: Any, ctx: "StepContext") -> dict[str, Any]:
        """One step. Returns scalars to log (tensors or floats); "loss" is the divergence-guarded one and,
        with automatic optimisation, the one the engine backpropagates. "samples" (int) counts images."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, ctx: "StepContext") -> dict[str, Any] | None:
        return None

    def on_epoch_end(self, epoch: int, ctx: "StepContext") -> dict[str, Any] | None:
        """Called after the epoch's steps; what it returns joins the epoch's record."""
        return None

    def validate(self, ctx: "StepContext") -> dict[str, Any] | None:
        """Validation metrics of the current weights (keys prefixed ``val_`` by convention), or None."""
        return None

    def teardown(self, ctx: "StepContext") -> None:
        """Called when training ends or fails (restore thread counts, stop loader workers)."""

    def state_dict(self) -> dict[str, Any]:
        """Networks and method state for ``last.pt`` (tensors, numbers, strings, lists, dicts only)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def final_metrics(self, history: list[dict[str, Any]], ctx: "StepContext") -> dict[str, Any]:
        """The run's metrics, written to metrics.json and model.json; default: the last epoch's record."""
        return dict(history[-1]) if history else {}

    def export(self, ctx: "StepContext") -> tuple[nn.Module, dict[str, Any]]:
        """The network to save as model.pt and its model.json fields (task, classes, input_size, mean, std,
        and for networks other than FERNet a ``model`` entry that tasks.engine.checkpoint knows how to rebuild)."""
        raise NotImplementedError
