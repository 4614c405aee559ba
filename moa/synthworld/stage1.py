"""Stage 1 of SynthWorld: the pretrained models MoA builds on, trained from scratch with the same framework.

Three Lightning modules, trained on the synthetic world:

- ``VAELitModule``: the autoencoder (reconstruction + a small KL term), so latents mean something.
- ``PriorLitModule``: U-Net and text encoder, denoising in that VAE's latent space (the VAE frozen),
  with caption dropout for classifier-free guidance.
- ``ClipLitModule``: the image encoder, a tiny CLIP trained contrastively on subject crops paired with
  captions that name every identity attribute (``SubjectCaptionDataModule``), as CLIP learns from web
  captions; without it the image encoder is random and every subject looks alike to it.

Each exports a folder in its library's format (``export``): the prior's is a complete Stable Diffusion
pipeline and the encoder's a CLIP model folder, so MoA trains on them exactly as on SD1.5 and CLIP.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.data import DataLoader, TensorDataset
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from moa.data.datamodule import ResumableStreamSampler
from moa.data.transforms import SubjectImageSpec, empty_caption_ids
from moa.models.losses import min_snr_weights
from moa.pretrained import check_pretrained_path
from moa.seeding import step_generator
from moa.synthworld.world import describe_identity, subject_crops

log = logging.getLogger(__name__)


class VAELitModule(pl.LightningModule):
    """Trains ``stable-diffusion/vae`` of a base folder from its initial weights.

    Args:
        base_model: a diffusers Stable Diffusion folder (its VAE is the starting point; its other
            components are copied unchanged into the export).
        optimizer: factory ``params -> Optimizer``.
        kl_weight: weight of the KL term (small: latents stay close to a unit Gaussian in scale).
        train_encoder: False fine-tunes the decoder alone (as Stability's ``sd-vae-ft-mse`` did): the
            latent space, scaling factor included, stays the base's, so a prior trained on the base
            VAE decodes through the new decoder unchanged.
    """

    def __init__(self, *, base_model: str, optimizer: Callable, kl_weight: float = 1e-6, train_encoder: bool = True,
                 seed: int = 0):
        super().__init__()
        check_pretrained_path(base_model, option="model.base_model", expect="a diffusers Stable Diffusion folder")
        self.base_model, self.optimizer_factory, self.kl_weight, self.seed = base_model, optimizer, kl_weight, seed
        self.train_encoder = train_encoder
        self.vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
        if not train_encoder:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        # Running spread of the latents: the export sets scaling_factor = 1 / std, as SD's 0.18215 does.
        self.register_buffer("latent_std", torch.ones(()))
        self.save_hyperparameters({"kl_weight": kl_weight, "train_encoder": train_encoder, "seed": seed})

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.vae.parameters() if p.requires_grad])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pixels = batch["pixel_values"]
        with torch.set_grad_enabled(self.train_encoder):
            posterior = self.vae.encode(pixels).latent_dist
        self.latent_std.mul_(0.98).add_(0.02 * posterior.mean.detach().std())
        reconstruction = self.vae.decode(posterior.sample(step_generator(self, self.seed))).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = mse + self.kl_weight * kl
        self.log_dict({"train/reconstruction": mse, "train/kl": kl, "train/loss": loss}, batch_size=pixels.shape[0])
        return loss

    def export(self, out_dir: str | os.PathLike) -> Path:
        """The base folder with the trained VAE in place of the old one, and the latent scale refit
        (kept when the encoder was frozen: the latents are the base's)."""
        pipe = StableDiffusionPipeline.from_pretrained(self.base_model, safety_checker=None,
                                                       requires_safety_checker=False)
        if self.train_encoder:
            self.vae.register_to_config(scaling_factor=float(1.0 / self.latent_std))
        pipe.vae = self.vae
        pipe.save_pretrained(out_dir)
        return Path(out_dir)


class PriorLitModule(pl.LightningModule):
    """Trains U-Net and text encoder of a base folder for text-to-image denoising; VAE frozen.

    Args:
        base_model: a diffusers Stable Diffusion folder whose VAE is already trained (``VAELitModule``).
        optimizer: factory ``params -> Optimizer``.
        caption_dropout: probability of training on the empty caption (classifier-free guidance).
        snr_gamma: min-SNR loss weighting (``min_snr_weights``); None: the plain noise MSE.
        unet_block_out_channels: None: train the base folder's U-Net. A list of 4 widths: start instead
            from a fresh U-Net of the base's config at these widths (random weights): the prior's capacity
            as a lever, with the base's VAE and text encoder kept.

    A moving average of the weights is Lightning's ``EMAWeightAveraging`` callback (``+callbacks.ema``):
    the export then holds the average.
    """

    def __init__(self, *, base_model: str, optimizer: Callable, caption_dropout: float = 0.1,
                 snr_gamma: float | None = None, unet_block_out_channels: Sequence[int] | None = None,
                 seed: int = 0):
        super().__init__()
        check_pretrained_path(base_model, option="model.base_model", expect="a diffusers Stable Diffusion folder")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"model.snr_gamma={snr_gamma}: expected null or a positive number")
        self.base_model, self.optimizer_factory = base_model, optimizer
        self.caption_dropout, self.snr_gamma, self.seed = caption_dropout, snr_gamma, seed
        self.unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        if unet_block_out_channels is not None:
            self.unet = _fresh_unet(self.unet.config, unet_block_out_channels)
        self.text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae").requires_grad_(False).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
        self.register_buffer("empty_input_ids", empty_caption_ids(self.tokenizer), persistent=False)
        self.save_hyperparameters({"caption_dropout": caption_dropout, "snr_gamma": snr_gamma, "seed": seed,
                                   "unet_block_out_channels": unet_block_out_channels})

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def configure_optimizers(self):
        return self.optimizer_factory([*self.unet.parameters(), *self.text_encoder.parameters()])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        generator = step_generator(self, self.seed)
        pixels = batch["pixel_values"]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (pixels.shape[0],),
                                  generator=generator, device=self.device)
        keep = torch.rand(pixels.shape[0], generator=generator, device=self.device) >= self.caption_dropout
        input_ids = torch.where(keep[:, None], batch["input_ids"], self.empty_input_ids)
        text = self.text_encoder(input_ids)[0]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        per_sample = (self.unet(noisy, timesteps, text).sample - noise).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)
        loss = per_sample.mean()
        self.log("train/loss", loss, batch_size=pixels.shape[0])
        return loss

    def export(self, out_dir: str | os.PathLike) -> Path:
        """A complete Stable Diffusion folder with the trained U-Net and text encoder."""
        StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                                scheduler=self.noise_scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(out_dir)
        return Path(out_dir)


def _fresh_unet(config, block_out_channels: Sequence[int]) -> UNet2DConditionModel:
    """A randomly initialised U-Net of ``config``'s topology at other widths."""
    widths = tuple(int(w) for w in block_out_channels)
    groups = config.norm_num_groups
    if len(widths) != len(config.block_out_channels) or any(w <= 0 or w % groups for w in widths):
        raise ValueError(f"model.unet_block_out_channels={list(block_out_channels)}: expected "
                         f"{len(config.block_out_channels)} positive widths divisible by norm_num_groups={groups}")
    return UNet2DConditionModel.from_config({**config, "block_out_channels": widths})


def _pixels_and_ids(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r[0] for r in rows]), "input_ids": torch.stack([r[1] for r in rows])}


class SubjectCaptionDataModule(pl.LightningDataModule):
    """Every person of a SynthWorld folder's train split, as the image encoder sees them (cut from
    their scene and from their reference render), with a caption naming their identity attributes.

    Items: ``pixel_values`` (3, size, size) normalised for the encoder, ``input_ids`` (77,). The crops
    sit in memory (a few thousand 32x32 tensors); the stream resumes at the exact sample.
    """

    def __init__(self, *, root: str, clip: str, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_pretrained_path(clip, option="data.clip", expect="a CLIP model folder (tokenizer + image processor)")
        self.root, self.clip, self.batch_size, self.num_workers, self.seed = root, clip, batch_size, num_workers, seed
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            pixels, identities = subject_crops(self.root, "train", SubjectImageSpec.from_pretrained(self.clip))
            tokenizer = CLIPTokenizer.from_pretrained(self.clip)
            input_ids = tokenizer([describe_identity(i) for i in identities], padding="max_length", truncation=True,
                                  max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            self.dataset = TensorDataset(pixels, input_ids)
            log.info("%d subject crops with identity captions from %s", len(pixels), self.root)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        start = self.trainer.global_step * self.batch_size if self.trainer is not None else 0
        sampler = ResumableStreamSampler(len(self.dataset), seed=self.seed, start=start)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, collate_fn=_pixels_and_ids)


class ClipLitModule(pl.LightningModule):
    """Trains a CLIP model (both towers) with CLIP's symmetric contrastive loss on (subject crop,
    identity caption) pairs.

    Args:
        base_model: a CLIP model folder (``CLIPModel`` + tokenizer + image processor) to start from.
        optimizer: factory ``params -> Optimizer``.
    """

    def __init__(self, *, base_model: str, optimizer: Callable, seed: int = 0):
        super().__init__()
        check_pretrained_path(base_model, option="model.base_model", expect="a CLIP model folder")
        self.base_model, self.optimizer_factory, self.seed = base_model, optimizer, seed
        self.clip = CLIPModel.from_pretrained(base_model).train()  # from_pretrained returns eval mode
        self.save_hyperparameters({"seed": seed})

    def configure_optimizers(self):
        return self.optimizer_factory(self.clip.parameters())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self.clip(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True)
        # Matching pairs among the batch: the share of crops whose own caption scores highest.
        accuracy = (output.logits_per_image.argmax(-1) == torch.arange(len(output.logits_per_image),
                                                                        device=self.device)).float().mean()
        self.log_dict({"train/loss": output.loss, "train/match_accuracy": accuracy},
                      batch_size=batch["pixel_values"].shape[0])
        return output.loss

    def export(self, out_dir: str | os.PathLike) -> Path:
        """A CLIP model folder: the trained weights with the base folder's tokenizer and image processor."""
        self.clip.save_pretrained(out_dir)
        CLIPProcessor.from_pretrained(self.base_model).save_pretrained(out_dir)
        return Path(out_dir)
