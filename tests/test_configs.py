"""Every experiment composes and instantiates (tiny weights where real ones would be needed)."""

from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from moa.training.run import instantiate_group

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


def test_expected_experiments_exist():
    assert {"tiny", "moa_sd15", "ablation_no_moa", "ablation_vanilla_sd15", "ablation_no_spacetime"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, compose_cfg):
    cfg = compose_cfg(f"experiment={experiment}", ffhq_data=experiment != "synth_clip")
    is_moa = cfg.model._target_ == "moa.training.module.MoALitModule"
    if is_moa:  # the paper's router-loss weight, except in the router diagnostics that scale it on purpose
        expected = 1e-2 if experiment in ("synth_moa_router_x100", "synth_moa_router_fg") else 1e-4
        assert OmegaConf.select(cfg, "model.lambda_router") == expected
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.callbacks)
    loggers = instantiate_group(cfg.logger)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == cfg.trainer.max_steps
    assert datamodule.batch_size == 2
    assert callable(module.export)
    if not is_moa:  # SynthWorld stage 1 (VAE, prior)
        assert experiment.startswith("synth_")
        return
    variant = module.model.moa_config.variant
    assert variant == ("no_moa" if experiment.endswith("no_moa") else "moa")
    assert module.model.spacetime == (not experiment.endswith("no_spacetime"))
    if experiment.startswith("synth_"):
        from moa.synthworld.world import ReferenceRenders

        assert isinstance(datamodule.subject_source, ReferenceRenders)


def test_paper_settings_in_moa_sd15(compose_cfg):
    cfg = compose_cfg("experiment=moa_sd15", "trainer=ddp")
    assert cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_steps == 40000
    assert cfg.model.optimizer.lr == 5e-5
    assert cfg.model.max_timestep == 800 and cfg.model.condition_dropout == 0.1
    assert cfg.model.net.moa_config.loss_skip_first_blocks == 2
    assert cfg.model.net.moa_config.loss_skip_last_blocks == 3


def test_debug_config_shortens_a_run(compose_cfg):
    cfg = compose_cfg("debug=fast")
    assert cfg.trainer.max_steps == 3 and cfg.callbacks.model_checkpoint.every_n_train_steps == 3
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_group(cfg.callbacks), logger=False)
    assert trainer.max_steps == 3
