"""One home for seeding: every random stream of a run is derived from (seed, position) by one rule."""

from __future__ import annotations

import torch

# A prime stride: (seed, position) pairs map to distinct seeds for positions below it.
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, position: int) -> int:
    """The seed of stream ``position`` (an epoch, a sample, a step) of a run seeded with ``seed``."""
    return seed * SEED_STRIDE + position


def step_generator(module, seed: int) -> torch.Generator:
    """All of a training step's randomness, seeded by (seed, global step, rank): a resumed run draws
    exactly what an uninterrupted one would have. ``module`` is a LightningModule."""
    generator = torch.Generator(device=module.device)
    generator.manual_seed(derived_seed(seed, module.global_step) * 4099 + module.global_rank)
    return generator
