"""The Lightning module that trains MoA (paper Sec. 3.3 and Table 1)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel

from moa.data.transforms import empty_caption_ids
from moa.models.losses import (
    BackgroundInfluenceLoss,
    MaskedDenoisingLoss,
    ObjectLocalizationLoss,
    RouterLoss,
    denoising_target,
    latent_union_mask,
    min_snr_weights,
)
from moa.models.model import MoAModel
from moa.models.unet import loss_layer_names, moa_processors
from moa.seeding import derived_seed, step_generator

log = logging.getLogger(__name__)

FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weights`` in [0, 1] (same shape), 0 where the weights are all 0."""
    return (values * weights).sum() / weights.sum().clamp(min=1e-6)


class MoALitModule(pl.LightningModule):
    """Trains the personalized experts, routers and multimodal prompt encoder; everything else is frozen.

    Loss: ``L_masked + lambda_router * L_router + lambda_object * L_object`` (see ``moa.models.losses``).

    Args:
        net: the ``MoAModel`` (frozen prior + trainable MoA parts), kept as ``self.model``.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_: true``).
        lr_scheduler: optional factory ``optimizer -> LRScheduler``, stepped every optimizer step.
        lambda_router, lambda_object: loss weights (paper: 1e-4 each; non-negative).
        router_loss_reduction: ``"sum_per_image"`` (eq. 9, default) or ``"mean"`` (see ``RouterLoss``).
        router_loss_foreground_weight: 0 (the paper); above 0 the router loss also pulls subject pixels to
            the personalized expert (see ``RouterLoss``).
        lambda_background_influence: 0 (the paper); above 0 adds this weight times
            ``BackgroundInfluenceLoss``: the energy of what the personalized expert changes on background
            pixels, in every MoA layer (not only the router loss's set). Needs the ``moa`` variant.
        image_encoder_lr: learning rate of the image encoder's trainable layers (``net``'s
            ``image_encoder_trainable_layers``); None: the optimizer's rate.
        lr_scale: per-part multipliers of the optimizer's rate: ``experts`` (start as copies of the
            prior), ``routers`` and ``prompt_encoder`` (start from scratch); missing parts: 1.
        condition_dropout: probability of dropping text and subjects together (classifier-free guidance).
        subject_dropout: probability of dropping each subject alone, its word kept in the caption
            (FastComposer's ``1 - object_appear_prob``). A dropped subject's pixels count as background
            for the router loss: this is what teaches a router to hand a pixel back to the prior.
        text_only_dropout: probability of dropping all subjects of a sample, the caption kept.
        face_loss_weight: 1 (the paper) weighs every subject pixel alike in ``L_masked``. Above 1, subject
            pixels inside the subject's face box (``data.face_regions``) weigh this much more: the few
            pixels that tell people apart (hair colour, skin) otherwise barely move a loss that the
            subject's clothes dominate. Our lever, not the paper's; at 3 it did not help in SynthWorld
            (``docs/synthworld/prior_recall/many_people_6k/face_loss/``).
        snr_gamma: min-SNR loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``): each sample's
            denoising loss is weighted by ``min(SNR, gamma) / SNR`` (``/ (SNR + 1)`` for v-prediction);
            None: unweighted (the paper).
        frozen_dtype: ``"bf16"`` or ``"fp16"`` stores the frozen weights (prior U-Net, VAE, text and image
            encoders) in that dtype, as diffusers' scripts do with ``weight_dtype`` (kohya: ``--full_bf16``
            for the frozen part): half their memory, no fp32 copies to cast each step. Needs a mixed
            ``trainer.precision`` (autocast); the trained weights stay fp32. None: fp32.
        ema_decay: keep an exponential moving average of the trainable weights (diffusers' ``EMAModel``,
            its warm-up included) and use it for samples, validation and the export; None: off.
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
                 router_loss_reduction: str = "sum_per_image", router_loss_foreground_weight: float = 0.0,
                 lambda_background_influence: float = 0.0,
                 image_encoder_lr: float | None = None,
                 lr_scale: dict[str, float] | None = None, condition_dropout: float = 0.1,
                 subject_dropout: float = 0.0, text_only_dropout: float = 0.0, face_loss_weight: float = 1.0,
                 snr_gamma: float | None = None,
                 ema_decay: float | None = None, frozen_dtype: str | None = None,
                 max_timestep: int = 800, gradient_checkpointing: bool = False, channels_last: bool = False,
                 compile_unet: bool = False, seed: int = 0):
        super().__init__()
        self.model = model = net
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        for name, weight in (("lambda_router", lambda_router), ("lambda_object", lambda_object),
                             ("lambda_background_influence", lambda_background_influence)):
            if weight < 0:
                raise ValueError(f"model.{name}={weight}: a loss weight must be >= 0")
        if lambda_background_influence and model.moa_config.variant != "moa":
            raise ValueError(f"model.lambda_background_influence={lambda_background_influence} needs the prior "
                             f"branch it measures against: model.net.moa_config.variant=moa, not "
                             f"{model.moa_config.variant!r}")
        self.lambda_router, self.lambda_object = lambda_router, lambda_object
        self.lambda_background_influence = lambda_background_influence
        if face_loss_weight < 1:
            raise ValueError(f"model.face_loss_weight={face_loss_weight}: expected >= 1 (1: every subject pixel alike)")
        self.face_loss_weight = face_loss_weight
        self.image_encoder_lr = image_encoder_lr
        self.lr_scale = dict(lr_scale or {})
        unknown = set(self.lr_scale) - {"experts", "routers", "prompt_encoder"}
        if unknown:
            raise ValueError(f"model.lr_scale has {sorted(unknown)}: expected experts, routers, prompt_encoder")
        self.condition_dropout, self.max_timestep, self.seed = condition_dropout, max_timestep, seed
        self.subject_dropout, self.text_only_dropout, self.snr_gamma = subject_dropout, text_only_dropout, snr_gamma
        # Not an nn.Module (diffusers' EMAModel): kept out of state_dict, saved in on_save_checkpoint.
        self.ema = EMAModel(model.trainable_parameters(), decay=ema_decay) if ema_decay is not None else None
        self._pending_ema_state: dict | None = None
        if not 0 < max_timestep <= model.noise_scheduler.config.num_train_timesteps:
            raise ValueError(f"model.max_timestep={max_timestep}: expected 1..{model.noise_scheduler.config.num_train_timesteps}")
        self.save_hyperparameters({"lambda_router": lambda_router, "router_loss_reduction": router_loss_reduction,
                                   "router_loss_foreground_weight": router_loss_foreground_weight,
                                   "lambda_background_influence": lambda_background_influence,
                                   "image_encoder_lr": image_encoder_lr, "lambda_object": lambda_object, "condition_dropout": condition_dropout,
                                   "lr_scale": self.lr_scale, "subject_dropout": subject_dropout,
                                   "text_only_dropout": text_only_dropout, "face_loss_weight": face_loss_weight,
                                   "snr_gamma": snr_gamma,
                                   "ema_decay": ema_decay, "frozen_dtype": frozen_dtype, "max_timestep": max_timestep,
                                   "seed": seed})
        self.masked_loss, self.object_loss = MaskedDenoisingLoss(), ObjectLocalizationLoss()
        self.router_loss = RouterLoss(router_loss_reduction, router_loss_foreground_weight)
        self.background_influence_loss = BackgroundInfluenceLoss()
        self.loss_layers = loss_layer_names(model.unet, model.moa_config)
        self.influence_layers = frozenset(moa_processors(model.unet)) if lambda_background_influence else frozenset()
        self.use_router = model.moa_config.variant == "moa"
        if gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        if channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            model.unet.compile()
        if frozen_dtype is not None:
            if frozen_dtype not in FROZEN_DTYPES:
                raise ValueError(f"model.frozen_dtype={frozen_dtype!r}: expected null or one of {sorted(FROZEN_DTYPES)}")
            for parameter in model.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(FROZEN_DTYPES[frozen_dtype])
        self.register_buffer("empty_input_ids", empty_caption_ids(model.tokenizer), persistent=False)
        self.strict_loading = False  # checkpoints hold only the trainable state

    def export(self, out_dir: str | os.PathLike) -> Path:
        """The trained MoA weights (their moving average when ``ema_decay`` is set) as safetensors + JSON
        (see ``MoAModel.export_moa``)."""
        with self.averaged_weights():
            return self.model.export_moa(out_dir)

    # ---- the moving average of the weights -------------------------------------------------------

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (nothing changes without EMA)."""
        if self.ema is None:
            yield
            return
        self._take_resumed_ema()
        parameters = self.model.trainable_parameters()
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def _take_resumed_ema(self) -> None:
        """Load a resumed run's moving average, once, on the module's device. Called at train start and
        before an export: a run resumed at its last step skips the fit loop and with it on_train_start."""
        if self._pending_ema_state is not None:
            self.ema.load_state_dict(self._pending_ema_state)
            self._pending_ema_state = None
        self.ema.to(device=self.device)

    def on_train_start(self) -> None:
        if self.ema is not None:
            self._take_resumed_ema()

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's optimizer step (once per accumulated step), then the moving average takes it in."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.model.trainable_parameters())

    # ---- frozen parts stay frozen and in eval mode ----------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.model.vae, self.model.text_encoder, self.model.image_encoder):
            frozen.eval()
        return self

    def configure_optimizers(self) -> Any:
        """One parameter group per trainable part, named so ``LearningRateMonitor`` logs each rate."""
        parts = {part: parameters for part, parameters in self.model.trainable_parts().items() if parameters}
        groups = [{"params": parameters, "name": part} for part, parameters in parts.items()]
        optimizer = self.optimizer_factory(groups)
        base_lr = optimizer.defaults["lr"]
        for group in optimizer.param_groups:
            if group["name"] == "image_encoder":
                group["lr"] = self.image_encoder_lr or base_lr
            else:
                group["lr"] = base_lr * self.lr_scale.get(group["name"], 1.0)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer=optimizer), "interval": "step"}}

    # ---- checkpoints hold the trainable state only ----------------------------------------------

    def _trainable_keys(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self._trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} MoA weights, e.g. {sorted(missing)[:3]}: "
                           "it was not written by this MoA configuration")
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise KeyError("model.ema_decay is set but the checkpoint holds no moving average: resume with "
                               "the run's own settings, or start a new run")
            self._pending_ema_state = checkpoint["ema"]  # loaded at train start, once on the right device

    # ---- the step --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        losses, stats = self.compute_losses(batch, step_generator(self, self.seed, micro_batch))
        for name, value in {**losses, **stats}.items():
            # No prog_bar: the progress bar would read the value back from the device every step.
            self.log(f"train/{name}", value, batch_size=batch["input_ids"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Denoising losses on held-out subjects with the same noise and timesteps at every validation
        (seeded by the batch index alone), no condition dropped, with the EMA weights when kept."""
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, batch_idx))
        with self.averaged_weights():
            losses, stats = self.compute_losses(batch, generator, dropout=False)
        for name, value in {**losses, **stats}.items():
            self.log(f"val/{name}", value, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def pixel_weights(self, batch: dict[str, torch.Tensor], foreground: torch.Tensor) -> torch.Tensor:
        """``L_masked``'s pixel weights (batch, 1, h, w): the subjects' union ``foreground``, its face
        pixels ``face_loss_weight`` times as heavy."""
        if self.face_loss_weight == 1:
            return foreground
        if "subject_face_masks" not in batch:
            raise ValueError(f"model.face_loss_weight={self.face_loss_weight} needs face regions in the batch: set "
                             "data.face_regions=true (person segments with face_bbox)")
        faces = latent_union_mask(batch["subject_face_masks"] * batch["subject_valid"][..., None, None],
                                  foreground.shape[-2:])
        return foreground * (1.0 + (self.face_loss_weight - 1.0) * faces)

    def compute_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator, dropout: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The training losses of one batch; ``dropout=False`` keeps every condition (validation)."""
        model = self.model
        batch_size, device = batch["input_ids"].shape[0], batch["input_ids"].device
        with torch.no_grad():
            if "latent_moments" in batch:  # data.cached_latents: the VAE's distribution, stored (moa.data.latents)
                posterior = DiagonalGaussianDistribution(batch["latent_moments"])
            else:
                posterior = model.vae.encode(batch["pixel_values"].to(model.vae.dtype)).latent_dist
            latents = posterior.sample(generator)
            latents = latents.float() * model.vae.config.scaling_factor  # fp32 even from a bf16/fp16 VAE
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            timesteps = torch.randint(0, self.max_timestep, (batch_size,), generator=generator, device=device)
            noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
            # Classifier-free guidance drops text and subjects together; subject and text-only dropout
            # drop subjects, keeping the caption. Drawn in every step, so the random stream is the same
            # whatever the probabilities.
            keep = torch.rand(batch_size, generator=generator, device=device) >= self.condition_dropout
            keep_subject = torch.rand(batch["subject_valid"].shape, generator=generator, device=device) >= self.subject_dropout
            keep_any = torch.rand(batch_size, generator=generator, device=device) >= self.text_only_dropout
            if not dropout:
                keep, keep_subject, keep_any = torch.ones_like(keep), torch.ones_like(keep_subject), torch.ones_like(keep_any)
            input_ids = torch.where(keep[:, None], batch["input_ids"], self.empty_input_ids)
            subject_valid = batch["subject_valid"] & keep[:, None] & keep_subject & keep_any[:, None]
            text = model.encode_text(input_ids)
        # Outside no_grad only when some image-encoder layers train (model.net.image_encoder_trainable_layers).
        with torch.set_grad_enabled(model.image_encoder_trainable_layers > 0):
            subject_features = model.encode_subjects(batch["subject_pixel_values"], batch.get("real_subject_slots"))

        moa = model.moa_inputs(
            text, timesteps=timesteps, subject_features=subject_features,
            subject_token_index=batch["subject_token_index"], subject_valid=subject_valid,
            record_router_layers=self.loss_layers if self.use_router else frozenset(),
            record_attention_layers=self.loss_layers,
            record_influence_layers=self.influence_layers,
        )
        prediction = model.unet(noisy, timesteps, text, cross_attention_kwargs={"moa": moa}).sample
        target = denoising_target(model.noise_scheduler, latents, noise, timesteps)
        latent_size = latents.shape[-2:]
        # Every annotated person is reconstructed; only the subjects actually given are the router's foreground.
        foreground = latent_union_mask(batch["subject_masks"] * batch["subject_valid"][..., None, None], latent_size)
        masks = batch["subject_masks"] * subject_valid[..., None, None]
        sample_weights = None if self.snr_gamma is None else min_snr_weights(model.noise_scheduler, timesteps,
                                                                              self.snr_gamma)
        losses = {"masked": self.masked_loss(prediction, target, self.pixel_weights(batch, foreground), sample_weights)}
        stats = {}
        total = losses["masked"]
        if self.use_router:
            given = latent_union_mask(masks, latent_size)
            losses["router"], prior_weight = self.router_loss(moa.router_maps, given)
            total = total + self.lambda_router * losses["router"]
            stats["router_prior_weight_foreground"] = masked_mean(prior_weight, given)
            stats["router_prior_weight_background"] = masked_mean(prior_weight, 1 - given)
            if self.influence_layers:
                losses["background_influence"], influence = self.background_influence_loss(moa.influence_maps, given)
                total = total + self.lambda_background_influence * losses["background_influence"]
                stats["personalized_influence_foreground"] = masked_mean(influence, given)
                stats["personalized_influence_background"] = masked_mean(influence, 1 - given)
        losses["object"] = self.object_loss(moa.subject_attention, masks, subject_valid)
        total = total + self.lambda_object * losses["object"]
        losses["loss"] = total
        return losses, stats
