"""Per-forward MoA inputs, passed to the U-Net as ``cross_attention_kwargs={"moa": MoAInputs(...)}``.

Diffusers hands ``cross_attention_kwargs`` to every attention processor, so this one object carries
what the processors need (the personalized condition of each cross-attention layer) and collects
what they report (router maps, subject attention maps) for the losses and the visualisations. A new
object is made for every U-Net call, so nothing leaks between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class MoAInputs:
    """What the MoA processors read and write during one U-Net forward.

    Attributes:
        personalized_condition: (batch, blocks, tokens, text_dim) condition of the personalized
            cross-attention expert for each transformer block (``blocks`` is 1 when it does not
            depend on the layer, e.g. the ``no_spacetime`` ablation, and is then broadcast).
        personalized_key_mask: (batch, tokens) True where the personalized cross-attention expert may
            attend; None: everywhere. Set when subjects have extra tokens (``personalize_text``),
            so that a padded subject's keys are out.
        subject_token_index: (batch, subjects) token position of each subject's word.
        record_router_layers: processor names whose prior weight map ``R0`` is stored.
        record_attention_layers: cross-attention processor names whose personalized attention maps
            at the subject tokens are stored (recomputed beside the fused SDPA kernel).
        record_influence_layers: processor names whose personalized influence map is stored.
        prior_only: run every layer as the original model (no subject, no personalized expert).
        router_maps: filled by processors: name -> (batch, pixels) prior weight ``R0``.
        subject_attention: filled by processors: name -> (batch, pixels, subjects).
        influence_maps: filled by processors: name -> (batch, pixels) energy of what the personalized
            expert changes in the layer's output, ``mean_c (R1 * (pers - prior))^2``, relative to the
            mean energy of the prior's output (see ``personalized_influence``).
    """

    personalized_condition: torch.Tensor | None = None
    personalized_key_mask: torch.Tensor | None = None
    subject_token_index: torch.Tensor | None = None
    record_router_layers: frozenset[str] = frozenset()
    record_attention_layers: frozenset[str] = frozenset()
    record_influence_layers: frozenset[str] = frozenset()
    prior_only: bool = False
    router_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    subject_attention: dict[str, torch.Tensor] = field(default_factory=dict)
    influence_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not self.prior_only and self.personalized_condition is None:
            raise ValueError("MoAInputs needs personalized_condition unless prior_only=True")
        if self.record_attention_layers and self.subject_token_index is None:
            raise ValueError("MoAInputs.record_attention_layers needs subject_token_index")

    def condition_for_block(self, block_index: int) -> torch.Tensor:
        """(batch, tokens, text_dim) personalized condition of transformer block ``block_index``."""
        condition = self.personalized_condition
        return condition[:, block_index if condition.shape[1] > 1 else 0]


def pixel_map_to_grid(pixel_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reshape a flattened map (batch, pixels[, channels]) of a U-Net layer to (batch, channels, h, w).

    ``(height, width)`` is any reference size with the image's aspect ratio (latent or pixels): the
    layer's grid is the one with that aspect ratio and ``pixels`` cells.
    """
    if pixel_map.ndim == 2:
        pixel_map = pixel_map[..., None]
    batch, pixels, channels = pixel_map.shape
    h = round(math.sqrt(pixels * height / width))
    w = pixels // max(h, 1)
    if h * w != pixels:
        raise ValueError(f"a map of {pixels} pixels has no grid with the aspect ratio of {height}x{width}")
    return pixel_map.transpose(1, 2).reshape(batch, channels, h, w)
