"""SynthWorld stage 1: the tiny prior is trained by the same framework and exports a base model."""

import torch
from diffusers import AutoencoderKL

from moa.models.model import MoAModel
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
