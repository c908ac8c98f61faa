"""The one training engine: every method's training runs through :func:`fit`.

A method (PASM's supervised student, Progressive Teacher, CAF, the feature-loss network) is a small
:class:`Method` object: it builds its networks and optimisers, yields its batches, and defines one
training step. The engine owns the rest, once for all: device, AMP and channels_last, the seeding rule,
the learning-rate schedule, gradient clipping and the divergence guard, progress events, validation,
``last.pt`` resume (refused, naming what differs, when the config or an input changed) and the final
``model.pt`` + ``model.json`` checkpoint; and data-parallel training over N workers for the methods that
allow it (tasks.engine.distributed).
"""

from tasks.engine.loop import FitResult, StepContext, fit
from tasks.engine.method import Method
from tasks.engine.resume import ResumeMismatch, fingerprint
from tasks.engine.schedule import SCHEDULES, UNITS, Schedule
from tasks.engine.seeding import generator, seed_for
from tasks.engine.optim import OPTIMIZERS, build_optimizer
from tasks.engine.recipe import Recipe

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "UNITS",
    "FitResult",
    "Method",
    "Recipe",
    "ResumeMismatch",
    "Schedule",
    "StepContext",
    "build_optimizer",
    "fingerprint",
    "fit",
    "generator",
    "seed_for",
]
