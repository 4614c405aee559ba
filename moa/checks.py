"""Checks of a run's configuration that run before anything heavy is imported or loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moa.pretrained import check_pretrained_path


def preflight(cfg: DictConfig) -> None:
    """Check the run's input paths in a fraction of a second. Paths the embedded default builds
    itself are skipped (they appear on first use)."""
    embedded = cfg.get("embedded") or {}
    built = {str(embedded.get("data_root", "")), str(embedded.get("components_dir", ""))}

    def is_built(path: str) -> bool:
        return any(b and path.startswith(b) for b in built)

    root = str(cfg.data.root)
    if not is_built(root) and not Path(root).is_dir():
        raise FileNotFoundError(f"data.root={root!r}: no such folder (expected FastComposer's FFHQ-wild layout)")
    for option, expect in (("base_model", "a diffusers Stable Diffusion folder or a single-file checkpoint"),
                           ("image_encoder", "a CLIP vision model folder")):
        value = str(cfg[option])
        if not is_built(value):
            check_pretrained_path(value, option=option, expect=expect)
