"""MoA's training losses (paper eq. 9-12): ``L_masked + lambda_r * L_router + lambda_o * L_object``, and our
optional ``BackgroundInfluenceLoss`` (not the paper's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from moa.models.inputs import pixel_map_to_grid


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net predicts under ``scheduler``'s ``prediction_type``: the noise, or the velocity."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' ``--snr_gamma``), (batch,):
    ``min(SNR, gamma) / SNR`` for noise prediction, ``/ (SNR + 1)`` for v-prediction. Low-noise steps,
    whose easy targets otherwise dominate the gradient, are down-weighted to the level of ``gamma``."""
    snr = compute_snr(scheduler, timesteps)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return snr.clamp(max=gamma) / denominator


def latent_union_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Subject masks (batch, subjects, H, W) in [0, 1] -> their union at latent ``size``, (batch, 1, h, w)
    (antialiased bilinear, so partly covered latent pixels count in part)."""
    return F.interpolate(masks.amax(dim=1, keepdim=True), size=size, mode="bilinear", antialias=True,
                         align_corners=False)


class MaskedDenoisingLoss(nn.Module):
    """``|| M * (eps - eps_hat) ||^2`` normalised by the mask's area (foreground-only reconstruction).

    prediction, target (batch, channels, h, w); mask (batch, 1, h, w) >= 0: the subjects' mask in
    [0, 1] (the paper), or pixel weights (``face_loss_weight``: face pixels heavier), normalised by
    their sum so the loss keeps its scale; sample_weights (batch,) optional per-sample weights
    (min-SNR), applied before the same normalisation.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        squared = (prediction.float() - target.float()).pow(2) * mask
        if sample_weights is not None:
            squared = squared * sample_weights.float()[:, None, None, None]
        return squared.sum() / (mask.sum() * prediction.shape[1]).clamp(min=1.0)


ROUTER_LOSS_REDUCTIONS = ("sum_per_image", "mean")


def mean_over_layers(layer_maps: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-layer pixel maps name -> (batch, pixels), each resized (bilinear) to ``size`` = (h, w) of
    the latents, then averaged over layers -> (batch, 1, h, w)."""
    height, width = size
    return torch.stack([
        F.interpolate(pixel_map_to_grid(m.float(), height, width), size=(height, width), mode="bilinear",
                      align_corners=False)
        for m in layer_maps.values()
    ]).mean(dim=0)


def reduce_pixels(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """(batch, 1, h, w) -> scalar: ``"sum_per_image"`` sums each image's pixels then averages over the
    batch; ``"mean"`` averages every pixel of the batch."""
    return values.flatten(1).sum(1).mean() if reduction == "sum_per_image" else values.mean()


class RouterLoss(nn.Module):
    """``|| (1 - M) * (1 - R0_bar) ||^2``: background pixels should use the prior expert.

    ``R0_bar`` is the mean over the loss layers of each layer's prior weight, resized (bilinear) to the
    latent resolution. The foreground is left free.

    reduction: ``"sum_per_image"`` (default; our reading of eq. 9, whose squared L2 norm is a sum over
    the latent pixels of one image: summed per image, then averaged over the batch, so lambda_r = 1e-4
    weighs it as the paper does) or ``"mean"`` (over every pixel of the batch: 1 / (h * w) as strong;
    at 64x64 latents that is 4096x weaker, enough to leave the routers unsupervised under Adam).

    foreground_weight: 0 (the paper) leaves the subject free. Above 0 it adds
    ``foreground_weight * || M * R0_bar ||^2`` (same reduction), pulling subject pixels to the
    personalized expert: our lever, not the paper's, for routers that otherwise keep the subject on
    the prior while the personalized expert has little to offer it.
    """

    def __init__(self, reduction: str = "sum_per_image", foreground_weight: float = 0.0):
        super().__init__()
        if reduction not in ROUTER_LOSS_REDUCTIONS:
            raise ValueError(f"model.router_loss_reduction={reduction!r}: expected one of {ROUTER_LOSS_REDUCTIONS}")
        if foreground_weight < 0:
            raise ValueError(f"model.router_loss_foreground_weight={foreground_weight}: expected >= 0")
        self.reduction, self.foreground_weight = reduction, foreground_weight

    def forward(self, router_maps: dict[str, torch.Tensor], foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_maps: name -> (batch, pixels) prior weight; foreground (batch, 1, h, w).
        Returns the loss and ``R0_bar`` (batch, 1, h, w)."""
        prior_weight = mean_over_layers(router_maps, foreground.shape[-2:])
        squared = ((1.0 - foreground) * (1.0 - prior_weight)).pow(2)
        if self.foreground_weight:
            squared = squared + self.foreground_weight * (foreground * prior_weight).pow(2)
        return reduce_pixels(squared, self.reduction), prior_weight


class BackgroundInfluenceLoss(nn.Module):
    """``sum_pixels (1 - M) * I_bar``: the energy of what the personalized expert changes on the background.

    ``I_bar`` is the mean over the recorded layers of each layer's ``personalized_influence`` map
    (``R1 * (pers - prior)``, its energy relative to the prior's output), resized (bilinear) to the
    latent resolution; summed over an image's background pixels, then averaged over the batch.

    Our lever, not the paper's (``model.lambda_background_influence``, default 0). The router loss
    pushes the router *weight* of background pixels to the prior, but a weight is not influence: an
    expert that differs little from the prior may keep a large weight harmlessly, and one that differs
    much leaks the subject's identity into the scene through a small weight. In SynthWorld, background
    pixels routed wholly to the prior at inference halve what a subject swap changes outside the
    subject, while every router-loss weight tried left it at 0.55-0.67x no_moa
    (``docs/synthworld/prior_recall/many_people_6k/routing_oracle/``). This penalises the change itself,
    in every layer, through both the router and the personalized expert.
    """

    def forward(self, influence_maps: dict[str, torch.Tensor], foreground: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """influence_maps: name -> (batch, pixels); foreground (batch, 1, h, w).
        Returns the loss and ``I_bar`` (batch, 1, h, w)."""
        influence = mean_over_layers(influence_maps, foreground.shape[-2:])
        return reduce_pixels((1.0 - foreground) * influence, "sum_per_image"), influence


class ObjectLocalizationLoss(nn.Module):
    """FastComposer's balanced L1 localisation loss on the personalized experts' cross-attention.

    For each subject ``s`` and layer: ``mean_background(A_s) - mean_foreground(A_s)`` with ``A_s`` the
    attention probability (softmax over tokens, mean over heads) at the subject's token. Averaged as
    FastComposer does: over each sample's valid subjects, then over the batch (a sample without
    subjects, e.g. one whose condition was dropped, counts as 0), then over layers.
    """

    def forward(self, subject_attention: dict[str, torch.Tensor], subject_masks: torch.Tensor,
                subject_valid: torch.Tensor) -> torch.Tensor:
        """subject_attention: name -> (batch, pixels, subjects); subject_masks (batch, subjects, H, W);
        subject_valid (batch, subjects) bool."""
        valid = subject_valid.float()
        height, width = subject_masks.shape[-2:]
        losses = []
        for attention in subject_attention.values():
            grid = pixel_map_to_grid(attention.float(), height, width)
            masks = F.interpolate(subject_masks.float(), size=grid.shape[-2:], mode="bilinear", antialias=True,
                                  align_corners=False).flatten(2)  # (b, subjects, pixels)
            probs = grid.flatten(2)
            background = 1.0 - masks
            background_mean = (probs * background).sum(-1) / (background.sum(-1) + 1e-5)
            foreground_mean = (probs * masks).sum(-1) / (masks.sum(-1) + 1e-5)
            per_subject = (background_mean - foreground_mean) * valid  # (b, subjects)
            losses.append((per_subject.sum(-1) / valid.sum(-1).clamp(min=1.0)).mean())
        return torch.stack(losses).mean()
