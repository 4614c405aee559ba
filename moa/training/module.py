"""The Lightning module that trains MoA (paper Sec. 3.3 and Table 1)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from moa.data.transforms import empty_caption_ids
from moa.models.losses import MaskedDenoisingLoss, ObjectLocalizationLoss, RouterLoss
from moa.models.model import MoAModel
from moa.models.unet import loss_layer_names
from moa.seeding import step_generator

log = logging.getLogger(__name__)


class MoALitModule(pl.LightningModule):
    """Trains the personalized experts, routers and multimodal prompt encoder; everything else is frozen.

    Loss: ``L_masked + lambda_router * L_router + lambda_object * L_object`` (see ``moa.models.losses``).

    Args:
        net: the ``MoAModel`` (frozen prior + trainable MoA parts), kept as ``self.model``.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_: true``).
        lr_scheduler: optional factory ``optimizer -> LRScheduler``, stepped every optimizer step.
        lambda_router, lambda_object: loss weights (paper: 1e-4 each; non-negative).
        router_loss_reduction: ``"sum_per_image"`` (eq. 9, default) or ``"mean"`` (see ``RouterLoss``).
        image_encoder_lr: learning rate of the image encoder's trainable layers (``net``'s
            ``image_encoder_trainable_layers``); None: the optimizer's rate.
        condition_dropout: probability of dropping text and subjects together (classifier-free guidance).
        max_timestep: timesteps are drawn from ``[0, max_timestep)`` (paper: 800).
        gradient_checkpointing: recompute U-Net activations in backward (``use_reentrant=False``).
        channels_last: keep the U-Net's convolution activations in channels-last memory format.
        compile_unet: ``torch.compile`` the U-Net in place (parameter names, hence checkpoints, unchanged).
        seed: with the global step, seeds all of a step's randomness, so a resumed run repeats the
            uninterrupted one exactly.

    ``train.py`` adds the resolved run configuration to ``hparams["run_config"]`` (plain containers,
    so checkpoints load with ``torch.load(weights_only=True)``).
    """

    def __init__(self, *, net: MoAModel, optimizer: Callable, lr_scheduler: Callable | None = None,
                 lambda_router: float = 1e-4, lambda_object: float = 1e-4,
                 router_loss_reduction: str = "sum_per_image", image_encoder_lr: float | None = None,
                 condition_dropout: float = 0.1,
                 max_timestep: int = 800, gradient_checkpointing: bool = False, channels_last: bool = False,
                 compile_unet: bool = False, seed: int = 0):
        super().__init__()
        self.model = model = net
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        for name, weight in (("lambda_router", lambda_router), ("lambda_object", lambda_object)):
            if weight < 0:
                raise ValueError(f"model.{name}={weight}: a loss weight must be >= 0")
        self.lambda_router, self.lambda_object = lambda_router, lambda_object
        self.image_encoder_lr = image_encoder_lr
        self.condition_dropout, self.max_timestep, self.seed = condition_dropout, max_timestep, seed
        if not 0 < max_timestep <= model.noise_scheduler.config.num_train_timesteps:
            raise ValueError(f"model.max_timestep={max_timestep}: expected 1..{model.noise_scheduler.config.num_train_timesteps}")
        self.save_hyperparameters({"lambda_router": lambda_router, "router_loss_reduction": router_loss_reduction,
                                   "image_encoder_lr": image_encoder_lr, "lambda_object": lambda_object, "condition_dropout": condition_dropout,
                                   "max_timestep": max_timestep, "seed": seed})
        self.masked_loss, self.object_loss = MaskedDenoisingLoss(), ObjectLocalizationLoss()
        self.router_loss = RouterLoss(router_loss_reduction)
        self.loss_layers = loss_layer_names(model.unet, model.moa_config)
        self.use_router = model.moa_config.variant == "moa"
        if gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        if channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            model.unet.compile()
        self.register_buffer("empty_input_ids", empty_caption_ids(model.tokenizer), persistent=False)
        self.strict_loading = False  # checkpoints hold only the trainable state

    def export(self, out_dir: str | os.PathLike) -> Path:
        """The trained MoA weights as safetensors + JSON (see ``MoAModel.export_moa``)."""
        return self.model.export_moa(out_dir)

    # ---- frozen parts stay frozen and in eval mode ----------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.model.vae, self.model.text_encoder, self.model.image_encoder):
            frozen.eval()
        return self

    def configure_optimizers(self) -> Any:
        encoder = list(self.model.image_encoder_trainable_state_dict().values())
        encoder_ids = {id(p) for p in encoder}
        groups = [{"params": [p for p in self.model.trainable_parameters() if id(p) not in encoder_ids]}]
        if encoder:
            groups.append({"params": encoder, **({"lr": self.image_encoder_lr} if self.image_encoder_lr else {})})
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    # ---- checkpoints hold the trainable state only ----------------------------------------------

    def _trainable_keys(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self._trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} MoA weights, e.g. {sorted(missing)[:3]}: "
                           "it was not written by this MoA configuration")

    # ---- the step --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        losses, stats = self.compute_losses(batch, step_generator(self, self.seed, micro_batch))
        for name, value in {**losses, **stats}.items():
            # No prog_bar: the progress bar would read the value back from the device every step.
            self.log(f"train/{name}", value, batch_size=batch["pixel_values"].shape[0])
        return losses["loss"]

    def compute_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = self.model
        pixels = batch["pixel_values"]
        batch_size, device = pixels.shape[0], pixels.device
        with torch.no_grad():
            latents = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist.sample(generator)
            latents = latents * model.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            timesteps = torch.randint(0, self.max_timestep, (batch_size,), generator=generator, device=device)
            noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
            # Classifier-free guidance: drop text and subjects together.
            keep = torch.rand(batch_size, generator=generator, device=device) >= self.condition_dropout
            input_ids = torch.where(keep[:, None], batch["input_ids"], self.empty_input_ids)
            subject_valid = batch["subject_valid"] & keep[:, None]
            text = model.encode_text(input_ids)
        # Outside no_grad only when some image-encoder layers train (model.net.image_encoder_trainable_layers).
        with torch.set_grad_enabled(model.image_encoder_trainable_layers > 0):
            subject_features = model.encode_subjects(batch["subject_pixel_values"])

        moa = model.moa_inputs(
            text, timesteps=timesteps, subject_features=subject_features,
            subject_token_index=batch["subject_token_index"], subject_valid=subject_valid,
            record_router_layers=self.loss_layers if self.use_router else frozenset(),
            record_attention_layers=self.loss_layers,
        )
        prediction = model.unet(noisy, timesteps, text, cross_attention_kwargs={"moa": moa}).sample
        if model.noise_scheduler.config.prediction_type == "v_prediction":
            target = model.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        masks = batch["subject_masks"] * batch["subject_valid"][..., None, None]
        foreground = F.interpolate(masks.amax(dim=1, keepdim=True), size=latents.shape[-2:], mode="bilinear",
                                   antialias=True, align_corners=False)
        losses = {"masked": self.masked_loss(prediction, target, foreground)}
        stats = {}
        total = losses["masked"]
        if self.use_router:
            losses["router"], prior_weight = self.router_loss(moa.router_maps, foreground)
            total = total + self.lambda_router * losses["router"]
            stats["router_prior_weight_foreground"] = (prior_weight * foreground).sum() / foreground.sum().clamp(min=1e-6)
            stats["router_prior_weight_background"] = (prior_weight * (1 - foreground)).sum() / (1 - foreground).sum().clamp(min=1e-6)
        losses["object"] = self.object_loss(moa.subject_attention, masks, subject_valid)
        total = total + self.lambda_object * losses["object"]
        losses["loss"] = total
        return losses, stats
