"""Device resolution, one rule for every stage: "auto" is the GPU when this process sees one, else the CPU.

On a Ray worker "this process" is what Ray gave the actor (Ray hides GPUs from CPU-only actors). A
module of its own so that stages which only need a device do not depend on the trainer's code.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a CUDA request without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu or auto")
    return dev
