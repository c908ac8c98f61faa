"""The seeding rule of every method: one independent stream per (run seed, epoch, purpose).

Nothing random is carried from one epoch to the next: the engine reseeds torch's global generator at
the start of each epoch and a method draws its batch order, flips and crops from :func:`generator`
with its own purpose number. A run resumed after epoch k therefore replays epoch k + 1 exactly as an
uninterrupted run would (bit-identical on CPU), without saving any RNG state.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes shared by the methods (a method needing another stream picks a number from 16 up).
GLOBAL = 0  # torch's global generator at the start of an epoch
FLIP = 1  # horizontal flips
ORDER = 2  # batch order (and the shard order of a streamed epoch)
TRANSFORM = 3  # other augmentation: crops, random erasing
WORKER = 4  # a streaming loader worker's shuffle buffer


def seed_for(*parts: int) -> int:
    """A 63-bit seed from any tuple of integers (SeedSequence: nearby tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU torch generator seeded by :func:`seed_for`."""
    return torch.Generator().manual_seed(seed_for(*parts))


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed torch's global generators (dropout, any unseeded draw) for ``epoch`` of run ``seed``."""
    torch.manual_seed(seed_for(seed, epoch, GLOBAL))
