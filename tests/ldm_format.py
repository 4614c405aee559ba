"""Write a diffusers Stable Diffusion folder as one LDM-format (original CompVis layout) .safetensors file,
the format community SD1.5 checkpoints ship in, so the single-file loading path is tested on real
layout. The key mapping is the inverse of what diffusers' single-file loader applies (SD1.x layout:
4 U-Net levels, 2 resnets each, attention in the first 3; any VAE depth)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
               "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _unet_prefixes() -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix."""
    prefixes = {v: k for k, v in UNET_TOP.items()}
    for level in range(4):
        for layer in range(2):
            prefixes[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{3 * level + layer + 1}.0"
            if level < 3:
                prefixes[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{3 * level + layer + 1}.1"
        for layer in range(3):
            prefixes[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{3 * level + layer}.0"
            if level > 0:
                prefixes[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{3 * level + layer}.1"
        if level < 3:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{3 * (level + 1)}.0.op"
            prefixes[f"up_blocks.{level}.upsamplers.0"] = f"output_blocks.{3 * level + 2}.{1 if level == 0 else 2}"
    prefixes["mid_block.attentions.0"] = "middle_block.1"
    for layer in range(2):
        prefixes[f"mid_block.resnets.{layer}"] = f"middle_block.{2 * layer}"
    return prefixes


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    prefix = max((p for p in prefixes if key == p or key.startswith(p + ".")), key=len)
    rest = key[len(prefix):]
    for diffusers_name, ldm_name in inner.items():
        rest = rest.replace(f".{diffusers_name}.", f".{ldm_name}.")
    return prefixes[prefix] + rest


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes()
    resnet = {v: k for k, v in UNET_RESNET.items()}
    return {"model.diffusion_model." + _rename(k, prefixes, resnet if ".resnets." in k else {}): v
            for k, v in unet.state_dict().items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    prefixes = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                 "post_quant_conv"):
        prefixes[name] = name
    for level in range(levels):
        for layer in range(vae.config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{level}.resnets.{layer}"] = f"encoder.down.{level}.block.{layer}"
            prefixes[f"decoder.up_blocks.{level}.resnets.{layer}"] = f"decoder.up.{levels - 1 - level}.block.{layer}"
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - level}.upsample.conv"
    for side in ("encoder", "decoder"):
        for layer in range(2):
            prefixes[f"{side}.mid_block.resnets.{layer}"] = f"{side}.mid.block_{layer + 1}"
        for ldm, diffusers_name in VAE_ATTENTION.items():
            prefixes[f"{side}.mid_block.attentions.0.{diffusers_name}"] = f"{side}.mid.attn_1.{ldm}"
    resnet = {v: k for k, v in VAE_RESNET.items()}
    converted = {}
    for key, value in vae.state_dict().items():
        ldm_key = _rename(key, prefixes, resnet)
        if ".mid.attn_1." in ldm_key and value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        converted["first_stage_model." + ldm_key] = value
    return converted


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Released SD1.x files hold OpenAI CLIP's text model as ``cond_stage_model.transformer.text_model.*``
    (recent transformers name the same tensors without the ``text_model.`` level)."""
    return {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in text_encoder.state_dict().items()}


def write_ldm_checkpoint(diffusers_folder: str | Path, out_file: str | Path) -> Path:
    folder = Path(diffusers_folder)
    state = {**unet_to_ldm(UNet2DConditionModel.from_pretrained(folder, subfolder="unet")),
             **vae_to_ldm(AutoencoderKL.from_pretrained(folder, subfolder="vae")),
             **text_encoder_to_ldm(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return Path(out_file)
