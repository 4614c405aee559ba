"""The embedded default's assets: tiny models and a synthetic FFHQ-wild set, built on first use."""

from __future__ import annotations

import logging

from moa.synthworld.world import write_synthetic_ffhq
from moa.tiny import build_tiny_components

log = logging.getLogger(__name__)


def ensure_embedded_assets(*, components_dir: str, data_root: str, num_samples: int, image_size: int) -> None:
    """Build (once; later calls reuse them) the tiny components and the synthetic data set."""
    build_tiny_components(components_dir)
    write_synthetic_ffhq(data_root, num_samples=num_samples, size=image_size)
    log.info("embedded assets ready: models in %s, data in %s", components_dir, data_root)
