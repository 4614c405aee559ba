"""Installing MoA into a diffusers ``UNet2DConditionModel`` and saving/restoring only its weights."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from moa.models.attention import MoAAttnProcessor

log = logging.getLogger(__name__)

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_ATTENTION_NAME = re.compile(
    r"^(?P<section>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<transformer>\d+)\.attn(?P<kind>[12])$"
)


class MoALayoutError(ValueError):
    """The U-Net's attention layers are not the layout MoA was configured for."""


@dataclass(frozen=True)
class MoAConfig:
    """Everything needed to rebuild the MoA layers on a base U-Net (stored beside exported weights).

    Attributes:
        variant: ``"moa"`` (prior + personalized experts + router) or ``"no_moa"`` (one trained
            attention receiving the multimodal condition, no prior branch, no router).
        router_hidden_dim: ``None`` for a linear router, else the hidden width of a 2-layer MLP.
        num_transformer_blocks: expected transformer blocks in the U-Net (SD1.5: 16).
        loss_skip_first_blocks / loss_skip_last_blocks: transformer blocks left out of the router
            and object losses (paper: the first 2 and the last 3).
    """

    variant: str = "moa"
    router_hidden_dim: int | None = None
    num_transformer_blocks: int = 16
    loss_skip_first_blocks: int = 2
    loss_skip_last_blocks: int = 3

    def __post_init__(self):
        if self.variant not in ("moa", "no_moa"):
            raise ValueError(f"MoAConfig.variant must be 'moa' or 'no_moa', got {self.variant!r}")
        kept = self.num_transformer_blocks - self.loss_skip_first_blocks - self.loss_skip_last_blocks
        if kept <= 0:
            raise ValueError(
                f"MoAConfig: loss_skip_first_blocks={self.loss_skip_first_blocks} + loss_skip_last_blocks="
                f"{self.loss_skip_last_blocks} leave no block of {self.num_transformer_blocks} for the losses"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _execution_order_key(name: str) -> tuple[int, ...]:
    match = _ATTENTION_NAME.match(name)
    return (
        _SECTION_ORDER[match["section"]],
        int(match["block"] or 0),
        int(match["attention"]),
        int(match["transformer"]),
        int(match["kind"]),
    )


def _check_host(name: str, attn: Attention, *, cross: bool) -> None:
    unsupported = {
        "spatial_norm": attn.spatial_norm is not None,
        "group_norm": attn.group_norm is not None,
        "norm_cross": bool(attn.norm_cross),
        "residual_connection": bool(attn.residual_connection),
        "norm_q/norm_k": attn.norm_q is not None or attn.norm_k is not None,
        "rescale_output_factor != 1": attn.rescale_output_factor != 1.0,
    }
    used = [feature for feature, present in unsupported.items() if present]
    if used:
        raise MoALayoutError(f"attention layer {name} uses {', '.join(used)}, which MoA does not support")
    if attn.is_cross_attention != cross:
        kind = "cross" if cross else "self"
        raise MoALayoutError(f"attention layer {name} was expected to be {kind}-attention")


def attention_layers(unet: UNet2DConditionModel, config: MoAConfig = MoAConfig()) -> dict[str, Attention]:
    """The U-Net's attention modules in execution order, checked against ``config``.

    Raises ``MoALayoutError`` unless every transformer block has a self- (``attn1``) and a
    cross-attention (``attn2``) layer and there are ``config.num_transformer_blocks`` of them.
    """
    found = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if not _ATTENTION_NAME.match(name):
                raise MoALayoutError(f"attention layer {name} is not inside a U-Net transformer block")
            found[name] = module
    names = sorted(found, key=_execution_order_key)
    blocks = sorted({name[: -len(".attn1")] for name in names}, key=lambda b: _execution_order_key(b + ".attn1"))
    if len(blocks) != config.num_transformer_blocks:
        raise MoALayoutError(
            f"the U-Net has {len(blocks)} transformer blocks, MoAConfig.num_transformer_blocks expects "
            f"{config.num_transformer_blocks} (SD1.5 has 16)"
        )
    for block in blocks:
        for kind, cross in (("attn1", False), ("attn2", True)):
            if f"{block}.{kind}" not in found:
                raise MoALayoutError(f"transformer block {block} has no {kind}")
            _check_host(f"{block}.{kind}", found[f"{block}.{kind}"], cross=cross)
    return {name: found[name] for name in names}


def install_moa(unet: UNet2DConditionModel, config: MoAConfig = MoAConfig()) -> list[nn.Parameter]:
    """Replace every attention processor of ``unet`` with a ``MoAAttnProcessor``.

    Freezes the U-Net's own parameters (they are the prior) and returns the new trainable ones
    (personalized experts and routers). The processors become submodules of the U-Net, so they move
    with ``unet.to(...)`` and appear in its ``state_dict``.
    """
    layers = attention_layers(unet, config)
    unet.requires_grad_(False)
    block_names = list(dict.fromkeys(name[: -len(".attn1")] for name in layers))
    processors = {}
    for name, attn in layers.items():
        processor = MoAAttnProcessor(
            attn,
            name=name,
            block_index=block_names.index(name[: -len(".attn1")]),
            is_cross_attention=name.endswith("attn2"),
            use_prior_branch=config.variant == "moa",
            router_hidden_dim=config.router_hidden_dim,
        )
        weight = attn.to_q.weight
        processors[f"{name}.processor"] = processor.to(device=weight.device, dtype=weight.dtype)
    unet.set_attn_processor(processors)
    trainable = [p for processor in moa_processors(unet).values() for p in processor.parameters()]
    log.info(
        "installed MoA (%s) in %d attention layers: %.2fM trainable parameters",
        config.variant,
        len(layers),
        sum(p.numel() for p in trainable) / 1e6,
    )
    return trainable


def moa_processors(unet: UNet2DConditionModel) -> dict[str, MoAAttnProcessor]:
    """Installed MoA processors by layer name, in execution order."""
    processors = {
        name[: -len(".processor")]: proc
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, MoAAttnProcessor)
    }
    if not processors:
        raise MoALayoutError("the U-Net has no MoA processors: call install_moa(unet) first")
    return {name: processors[name] for name in sorted(processors, key=_execution_order_key)}


def loss_layer_names(unet: UNet2DConditionModel, config: MoAConfig) -> frozenset[str]:
    """Names of the processors whose maps enter the router and object losses (the set ``L``)."""
    last = config.num_transformer_blocks - config.loss_skip_last_blocks
    return frozenset(
        name
        for name, proc in moa_processors(unet).items()
        if config.loss_skip_first_blocks <= proc.block_index < last
    )


def moa_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Only the MoA weights: ``"<layer name>.<parameter>"`` -> tensor."""
    return {
        f"{name}.{key}": value
        for name, proc in moa_processors(unet).items()
        for key, value in proc.state_dict().items()
    }


def load_moa_state_dict(unet: UNet2DConditionModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights saved by ``moa_state_dict``; any missing, extra or misshaped key is an error."""
    expected = moa_state_dict(unet)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        raise MoALayoutError(
            "MoA weights do not match this U-Net's MoA layers: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(misshaped)} with another shape (e.g. {misshaped[:2]})"
        )
    for name, proc in moa_processors(unet).items():
        prefix = f"{name}."
        proc.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
