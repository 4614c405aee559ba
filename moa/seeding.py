"""One home for seeding: every random stream of a run is derived from (seed, position) by one rule."""

from __future__ import annotations

import torch

# A prime stride: (seed, position) pairs map to distinct seeds for positions below it.
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, position: int) -> int:
    """The seed of stream ``position`` (an epoch, a sample, a step) of a run seeded with ``seed``."""
    return seed * SEED_STRIDE + position


def step_generator(module, seed: int, micro_batch: int = 0) -> torch.Generator:
    """All of a training step's randomness, seeded by (seed, global step, rank, micro-batch): a resumed
    run draws exactly what an uninterrupted one would have. ``module`` is a LightningModule;
    ``micro_batch`` is the index within gradient accumulation (the global step only advances once per
    optimizer step, so without it every micro-batch of a step would draw the same noise and timesteps)."""
    generator = torch.Generator(device=module.device)
    generator.manual_seed(derived_seed(seed, module.global_step) * 4099 + module.global_rank
                          + micro_batch * SEED_STRIDE ** 2)
    return generator
