"""Train MoA. `python train.py` runs the embedded tiny experiment; `experiment=moa_sd15` the paper's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import moa.resolvers  # noqa: F401  (registers the config resolvers before Hydra resolves anything)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from ``cfg``, fit, export the trained weights; returns (metrics, objects)."""
    from moa.checks import preflight

    preflight(cfg)
    # Heavy imports only now, so that a mistyped override or path fails in a second or two.
    import pytorch_lightning as pl

    from moa.run import instantiate_group, plain_config, resolve_ckpt_path, wandb_run_id

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("embedded"):
        from moa.embedded import ensure_embedded_assets

        ensure_embedded_assets(**cfg.embedded)

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
        if trainer.is_global_zero and cfg.get("export_dir"):
            log.info("exported the trained weights to %s", module.export(cfg.export_dir))
    finally:
        for logger in loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    metrics, _ = train(cfg)
    log.info("final metrics: %s", {k: round(v, 5) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
