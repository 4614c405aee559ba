"""SynthWorld stage 1: the tiny prior is trained by the same framework and exports a base model."""

import functools

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from moa.models.model import MoAModel
from moa.synthworld.stage1 import PriorLitModule
from moa.training.run import train


def test_vae_then_prior_stages_export_a_base_model_moa_can_use(compose_cfg, tmp_path, tiny_dir):
    vae_dir, prior_dir = tmp_path / "vae", tmp_path / "prior"
    common = ("callbacks=checkpoints", "trainer.max_steps=2", "data.batch_size=2")
    metrics, vae_run = train(compose_cfg("model=vae", *common, f"export_dir={vae_dir}", out=tmp_path / "a"))
    assert metrics["train/reconstruction"] > 0
    before = AutoencoderKL.from_pretrained(tiny_dir / "stable-diffusion", subfolder="vae")
    after = AutoencoderKL.from_pretrained(vae_dir, subfolder="vae")
    assert not torch.equal(before.encoder.conv_in.weight, after.encoder.conv_in.weight)
    assert after.config.scaling_factor != before.config.scaling_factor  # refit to the latents' spread

    metrics, _ = train(compose_cfg("model=prior", *common, f"base_model={vae_dir}", f"export_dir={prior_dir}",
                                   out=tmp_path / "b"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = MoAModel.from_pretrained(prior_dir, tiny_dir / "clip")
    assert torch.equal(model.vae.encoder.conv_in.weight, after.encoder.conv_in.weight)  # the VAE stayed frozen


def test_prior_min_snr_weighting_is_exact_at_infinite_gamma_and_down_weights_below(tiny_dir):
    base = tiny_dir / "stable-diffusion"
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(3, 3, 64, 64, generator=generator) * 2 - 1,
             "input_ids": torch.randint(0, 100, (3, 77), generator=generator)}

    def loss(snr_gamma):
        module = PriorLitModule(base_model=str(base), optimizer=functools.partial(torch.optim.AdamW),
                                snr_gamma=snr_gamma)
        with torch.no_grad():
            return module.training_step(batch, 0)

    plain = loss(None)
    torch.testing.assert_close(loss(1e12), plain, rtol=1e-6, atol=0)
    assert loss(1e-3) < 0.1 * plain, "gamma below every SNR must shrink every sample's weight"


def test_prior_with_the_ema_callback_exports_the_averaged_weights_also_when_rerun(compose_cfg, tmp_path, tiny_dir):
    export = tmp_path / "prior"
    cfg = compose_cfg(
        "model=prior", "callbacks=checkpoints", "callbacks.model_checkpoint.every_n_train_steps=3",
        "trainer.max_steps=3", "data.batch_size=2", "model.snr_gamma=5", "model.optimizer.lr=1e-2",
        f"base_model={tiny_dir}/stable-diffusion", f"export_dir={export}",
        "+callbacks.ema._target_=pytorch_lightning.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.5",
        "+callbacks.ema.use_buffers=false", out=tmp_path / "run")
    train(cfg)
    # The same command again resumes at step 3, where Lightning skips the fit loop and its on_train_end
    # (where the callback moves the average into the model): the export must not turn into the raw weights.
    train(cfg)
    # The step-3 checkpoint is written as the step ends, before the callback copies the average into the model.
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "step_0000003.ckpt", weights_only=True,
                            map_location="cpu")
    key = "unet.conv_in.weight"
    averaged, current = checkpoint["state_dict"][key], checkpoint["current_model_state"][key]
    assert not torch.allclose(averaged, current), "three steps at lr 1e-2 must leave the average behind the weights"
    exported = UNet2DConditionModel.from_pretrained(export, subfolder="unet").conv_in.weight
    torch.testing.assert_close(exported, averaged, rtol=0, atol=0)


def test_prior_at_other_widths_trains_from_a_fresh_unet_and_exports_a_base_moa_can_use(compose_cfg, tmp_path,
                                                                                      tiny_dir):
    base, export = tiny_dir / "stable-diffusion", tmp_path / "prior"
    train(compose_cfg("model=prior", "callbacks=checkpoints", "trainer.max_steps=2", "data.batch_size=2",
                      "model.unet_block_out_channels=[16,16,48,48]", f"base_model={base}", f"export_dir={export}",
                      out=tmp_path / "run"))
    unet = UNet2DConditionModel.from_pretrained(export, subfolder="unet")
    assert tuple(unet.config.block_out_channels) == (16, 16, 48, 48)
    model = MoAModel.from_pretrained(export, tiny_dir / "clip")
    assert model.unet.config.block_out_channels == unet.config.block_out_channels
    with pytest.raises(ValueError, match=r"model\.unet_block_out_channels=\[16, 12, 48, 48\].*norm_num_groups=8"):
        PriorLitModule(base_model=str(base), optimizer=functools.partial(torch.optim.AdamW),
                       unet_block_out_channels=[16, 12, 48, 48])
