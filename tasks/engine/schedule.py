"""Learning-rate schedules, one definition for every method: step, multistep, cosine, constant.

A schedule is a pure function of the position in training, so a resumed run (or a trial round that
stands in for a real one) sees exactly the rates an uninterrupted run would. ``unit`` says what the
numbers count: ``epoch`` (positions are fractional epochs) or ``iteration`` (parameter updates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("step", "multistep", "cosine", "constant")
UNITS = ("epoch", "iteration")


@dataclass(frozen=True)
class Schedule:
    kind: str = "step"
    unit: str = "epoch"
    step: int = 10  # step: decay every ``step`` units
    milestones: tuple[int, ...] = ()  # multistep: decay after each of these units
    gamma: float = 0.1  # decay factor of step / multistep
    warmup: float = 0.0  # linear warm-up over this many units (0 = none)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.unit not in UNITS:
            raise ValueError(f"lr unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.kind == "step" and self.step < 1:
            raise ValueError(f"lr_step must be >= 1, got {self.step}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.gamma}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def factor(self, position: float, total: float) -> float:
        """The multiplier of the base rate at ``position`` units into a run of ``total`` units.

        Step schedules use the whole units elapsed (epoch e of a run with step 10 is decayed from e = 10
        on, torch's StepLR); cosine and warm-up use the fractional position.
        """
        whole = math.floor(position + 1e-9)
        if self.kind == "step":
            f = self.gamma ** (whole // self.step)
        elif self.kind == "multistep":
            f = self.gamma ** sum(whole >= m for m in self.milestones)
        elif self.kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(position, total) / total)) if total > 0 else 1.0
        else:
            f = 1.0
        if self.warmup > 0 and position < self.warmup:
            f *= position / self.warmup
        return f
