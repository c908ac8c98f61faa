"""The fields every method's config shares, defined once: network, input, length, optimiser, schedule, seed.

Each method's config (TrainConfig, PTConfig, CAFConfig, FeatLossConfig) subclasses :class:`Recipe` and
overrides the defaults its paper gives, so ``fermine config --defaults`` names these fields the same way
in every section and :func:`tasks.engine.fit` reads them the same way for every method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tasks.engine.optim import OPTIMIZERS
from tasks.engine.schedule import SCHEDULES, UNITS, Schedule


@dataclass(frozen=True)
class Recipe:
    arch: str = "small_cnn"  # tasks.models registry name: small_cnn, resnet18/34/50, vgg16, convnet_s
    input_size: int = 64  # images are resized to input_size x input_size when decoded
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd (momentum), adam, adamw
    lr: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    lr_schedule: str = "step"  # step, multistep, cosine, constant
    lr_unit: str = "epoch"  # what lr_step, lr_milestones and warmup count: epoch or iteration
    lr_step: int = 10  # step: lr *= lr_gamma every lr_step units
    lr_milestones: tuple[int, ...] = ()  # multistep: lr *= lr_gamma after each of these units
    lr_gamma: float = 0.1
    warmup: float = 0.0  # linear learning-rate warm-up over this many units
    clip_grad_norm: float | None = None  # clip the gradient's global norm to this (None: no clipping)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu; or "cpu", "cuda", "cuda:1"
    amp: bool = True  # mixed precision (fp16 autocast + GradScaler) on CUDA; ignored on CPU
    pretrained: str | None = None  # local weights file or checkpoint folder to start from (never downloaded)
    # Data-parallel workers (Ray Train, each with the ray section's cpus/gpus per worker; the batch is split
    # over them, the recipe is unchanged). 1 = one process. A runtime field: resume ignores it.
    workers: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        checks = [
            (self.input_size >= 16, "input_size must be >= 16 pixels"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}"),
            (self.lr_unit in UNITS, f"lr_unit must be one of {', '.join(UNITS)}"),
            (self.lr_step >= 1, "lr_step must be >= 1"),
            (0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm must be > 0 (or null)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} ({name})")
        # Lists from YAML or JSON become tuples: configs stay hashable and compare equal after a round trip.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    def schedule(self) -> Schedule:
        return Schedule(self.lr_schedule, self.lr_unit, self.lr_step, self.lr_milestones, self.lr_gamma, self.warmup)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def fit_options(self) -> dict[str, Any]:
        """The keyword arguments of tasks.engine.fit this recipe sets."""
        return {"epochs": self.epochs, "schedule": self.schedule(), "seed": self.seed, "device": self.device,
                "amp": self.amp, "clip_grad_norm": self.clip_grad_norm}
