"""Shared pieces of the Hydra entry points: instantiation helpers and run bookkeeping (checkpoint choice, wandb id)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"


def instantiate_group(group: DictConfig | None, **extra_by_name: dict) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    objects = []
    for name, conf in (group or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            objects.append(hydra.utils.instantiate(conf, **extra_by_name.get(name, {})))
    return objects


def wandb_run_id(output_dir: Path) -> str:
    """The run's wandb id, persisted in the run directory so a resumed job continues the same run."""
    path = output_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase alphanumerics too
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``"last"`` -> the newest of the run directory's ``checkpoints/last.ckpt`` and the
    ``hpc_ckpt_*.ckpt`` that Lightning's SLURM requeue writes; none -> a fresh start."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        candidates = [p for p in [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
                      if p.exists()]
        if candidates:
            newest = max(candidates, key=lambda p: p.stat().st_mtime)
            log.info("resuming from %s", newest)
            return str(newest)
        log.info("no checkpoint in %s: starting fresh", output_dir)
        return None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return ckpt_path


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe for ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
