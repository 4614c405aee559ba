"""A training run from its Hydra config: ``train.py`` and ``python -m moa.training`` both call ``main``.

``train(cfg)`` is also what the tests and SynthWorld's stages call (in-process or through
``python -m moa.training``), so every route trains through the same code.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moa.checks import exit_on_config_error
from moa.config import CONFIG_DIR
from moa.files import atomic_folder, write_text
from moa.training.preflight import preflight

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
    write_text(path, run_id + "\n")
    return run_id


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe for ``torch.load(weights_only=True)``)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from ``cfg``, fit, export the trained weights; returns (metrics, objects)."""
    preflight(cfg)
    # Heavy imports only now, so that a mistyped override or path fails in a second or two.
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import WeightAveraging

    from moa.training.callbacks import PreemptionCheckpoint
    from moa.training.checkpoints import checkpoint_step, resolve_ckpt_path

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("embedded"):
        hydra.utils.call(cfg.embedded)  # builds the embedded default's models and data on first use

    # Cheap objects first: a wrong data path fails here, before any model is loaded.
    datamodule = hydra.utils.instantiate(cfg.data)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    logger_kwargs = {}
    if cfg.get("logger") and "wandb" in cfg.logger:
        logger_kwargs["wandb"] = {"id": wandb_run_id(output_dir), "resume": "allow"}
    loggers = instantiate_group(cfg.get("logger"), **logger_kwargs)
    callbacks = instantiate_group(cfg.get("callbacks"))

    # Seeded here, after the embedded assets: building them draws random numbers, and the initial MoA
    # weights must not depend on whether they were already built.
    pl.seed_everything(cfg.seed, workers=True)
    module = hydra.utils.instantiate(cfg.model)
    # Set after instantiation: Hydra would instantiate every _target_ inside a config passed as an argument.
    module.hparams["run_config"] = plain_config(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        preempted = any(isinstance(c, PreemptionCheckpoint) and c.preempted for c in callbacks)
        if preempted or trainer.interrupted:
            log.warning("training stopped at step %d before its end: not exporting; run the same command again "
                        "to resume", trainer.global_step)
        elif trainer.is_global_zero and cfg.get("export_dir"):
            if ckpt_path and trainer.global_step == checkpoint_step(Path(ckpt_path)):
                # Resumed at its last step: Lightning skipped the fit loop and its on_train_end, where
                # WeightAveraging puts the average into the model; without this the export is the raw weights.
                for callback in callbacks:
                    if isinstance(callback, WeightAveraging):
                        callback.on_train_end(trainer, module)
            with atomic_folder(cfg.export_dir) as staging:  # a stage is done once its export exists
                module.export(staging)
            log.info("exported the trained weights to %s", cfg.export_dir)
    finally:
        for logger in loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    metrics, _ = train(cfg)
    log.info("final metrics: %s", {k: round(v, 5) for k, v in metrics.items()})
