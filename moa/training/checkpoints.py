"""Checkpoints of a training run: which one a run resumes from, and the model a checkpoint holds.

A checkpoint holds the trainable state only, plus the resolved run configuration that built it
(``hparams["run_config"]``, plain containers), so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from moa.models.model import MoAModel
from moa.models.unet import MoALayoutError

log = logging.getLogger(__name__)


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


def model_from_checkpoint(ckpt_path: str | os.PathLike) -> MoAModel:
    """Rebuild the model from a Lightning checkpoint written by ``train.py``: the base model and MoA
    settings come from the run configuration stored in it, the weights from its state dict."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    run = checkpoint.get("hyper_parameters", {}).get("run_config")
    if not run:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r}: no run_config in the checkpoint (not written by train.py?)")
    settings = run["model"]["net"]
    model = MoAModel.from_pretrained(run["base_model"], run["image_encoder"], moa_config=settings["moa_config"],
                                     spacetime=settings["spacetime"], base_model_config=run.get("base_model_config"),
                                     image_encoder_trainable_layers=settings.get("image_encoder_trainable_layers", 0))
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    unexpected = set(state) - trainable
    if missing or unexpected:
        raise MoALayoutError(f"ckpt_path={str(ckpt_path)!r}: {len(missing)} MoA weights missing (e.g. "
                             f"{sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
    model.load_state_dict(state, strict=False)
    return model
