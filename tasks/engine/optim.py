"""Optimizer factory (timm's create_optimizer in small): the same names and arguments for every method."""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float,
                    weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``sgd`` (momentum), ``adam`` or ``adamw`` over ``params`` (parameters or param-group dicts)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
