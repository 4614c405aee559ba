"""Checkpoints of a training run: how they are written, which one a run resumes from, the model one holds.

A checkpoint holds the trainable state only, plus the resolved run configuration that built it
(``hparams["run_config"]``, plain containers), so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from moa.files import atomic_path, is_partial, remove_partials
from moa.models.model import MoAModel
from moa.models.unet import MoALayoutError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temp file in the checkpoint's own folder.

    Lightning writes local checkpoints through an fsspec transaction: a temp file in ``$TMPDIR``, moved
    into place at the end. When ``$TMPDIR`` is on another file system (a node-local /tmp, as on most
    clusters) that move is a copy, and a kill during it truncates the checkpoint and orphans the temp
    file. Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds, or None if it does not load (truncated, not a checkpoint).
    Memory-mapped, so checking a many-gigabyte checkpoint reads its index, not its tensors."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as error:  # any failure to read means: not usable
        log.warning("checkpoint %s is unreadable, skipping it (%s: %s)", path, type(error).__name__, error)
        return None


def run_checkpoints(output_dir: Path) -> list[Path]:
    """Every checkpoint a run directory holds, whatever wrote it: ``ModelCheckpoint``'s ``last``,
    ``last-vN`` and ``step_*``, the preemption callback's ``last``, Lightning's SLURM ``hpc_ckpt_*``."""
    found = [*(output_dir / "checkpoints").glob("*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
    return [p for p in found if not is_partial(p)]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``"last"`` -> the intact checkpoint of the run directory with the highest global step (the most
    recently written among equals), falling back past unreadable ones with a warning; none -> a fresh
    start. Temp files left by a kill during a checkpoint write are removed first."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        remove_partials(output_dir / "checkpoints")
        remove_partials(output_dir)
        candidates = sorted(run_checkpoints(output_dir), key=lambda p: p.stat().st_mtime, reverse=True)
        steps = {path: checkpoint_step(path) for path in candidates}
        intact = [path for path in candidates if steps[path] is not None]
        if intact:
            newest = max(intact, key=lambda p: (steps[p], p.stat().st_mtime))
            log.info("resuming from %s (step %d; %d checkpoint(s) found, %d unreadable)", newest, steps[newest],
                     len(candidates), len(candidates) - len(intact))
            return str(newest)
        if candidates:
            log.warning("no readable checkpoint among %s: starting fresh", [str(p) for p in candidates])
        else:
            log.info("no checkpoint in %s: starting fresh", output_dir)
        return None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return ckpt_path


def model_from_checkpoint(ckpt_path: str | os.PathLike) -> MoAModel:
    """Rebuild the model from a Lightning checkpoint written by ``train.py``: the base model and MoA
    settings come from the run configuration stored in it, the weights from its state dict (their
    moving average when the run kept one, as its export does)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r}: unreadable checkpoint ({type(error).__name__}: {error})") from error
    run = checkpoint.get("hyper_parameters", {}).get("run_config")
    if not run:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r}: no run_config in the checkpoint (not written by train.py?)")
    settings = run["model"]["net"]
    model = MoAModel.from_pretrained(run["base_model"], run["image_encoder"], moa_config=settings["moa_config"],
                                     spacetime=settings["spacetime"], base_model_config=run.get("base_model_config"),
                                     image_encoder_trainable_layers=settings.get("image_encoder_trainable_layers", 0),
                                     tokens_per_subject=settings.get("tokens_per_subject", 1),
                                     patch_tokens=settings.get("patch_tokens", False))
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    unexpected = set(state) - trainable
    if missing or unexpected:
        raise MoALayoutError(f"ckpt_path={str(ckpt_path)!r}: {len(missing)} MoA weights missing (e.g. "
                             f"{sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
    model.load_state_dict(state, strict=False)
    if checkpoint.get("ema"):  # a run with model.ema_decay: its moving average is what it exports and samples
        with torch.no_grad():
            for parameter, average in zip(model.trainable_parameters(), checkpoint["ema"]["shadow_params"], strict=True):
                parameter.copy_(average)
        log.info("%s: using the moving average of the weights (model.ema_decay)", ckpt_path)
    return model
