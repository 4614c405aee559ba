"""The MoA model: a frozen Stable Diffusion prior and CLIP image encoder plus MoA's trainable parts.

Shared by training (``moa.training.module``) and generation (``moa.inference.pipeline``): loading, freezing, turning
prompts and subject images into ``MoAInputs``, and saving/loading the trainable weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

from moa.data.transforms import SubjectImageSpec
from moa.files import atomic_path, write_text
from moa.models.inputs import MoAInputs
from moa.models.prompt import MultimodalPromptEncoder, personalize_text
from moa.models.unet import MoAConfig, MoALayoutError, install_moa, load_moa_state_dict, moa_state_dict
from moa.pretrained import check_pretrained_path, is_single_file, load_single_file_pipeline

log = logging.getLogger(__name__)

EXPORT_WEIGHTS = "moa.safetensors"
EXPORT_CONFIG = "moa_config.json"


def load_base_components(base_model: str | os.PathLike, base_model_config: str | None = None) -> dict:
    """U-Net, VAE, text encoder, tokenizer and training noise schedule of an SD1.5-family model."""
    if is_single_file(base_model):
        pipe = load_single_file_pipeline(base_model, base_model_config)
        return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                "noise_scheduler": DDPMScheduler.from_config(pipe.scheduler.config)}
    return {
        "unet": UNet2DConditionModel.from_pretrained(base_model, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(base_model, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        "noise_scheduler": DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
    }


def trainable_image_encoder_parts(image_encoder: CLIPVisionModelWithProjection, layers: int) -> list[nn.Module]:
    """The last ``layers`` transformer layers of the vision tower, its post-layernorm and projection
    (all that lies between those layers and ``image_embeds``); nothing for 0."""
    available = len(image_encoder.vision_model.encoder.layers)
    if not 0 <= layers <= available:
        raise ValueError(f"model.net.image_encoder_trainable_layers={layers}: expected 0..{available} "
                         "(the image encoder's transformer layers)")
    if layers == 0:
        return []
    return [*image_encoder.vision_model.encoder.layers[-layers:], image_encoder.vision_model.post_layernorm,
            image_encoder.visual_projection]


def load_image_encoder(path: str | os.PathLike) -> CLIPVisionModelWithProjection:
    """The vision half of a CLIP checkpoint (e.g. openai/clip-vit-large-patch14). Its text weights are
    expected to go unused, so transformers' report of them is silenced."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return CLIPVisionModelWithProjection.from_pretrained(path)
    finally:
        transformers_logging.set_verbosity(verbosity)


def encode_images(image_encoder: CLIPVisionModelWithProjection, subject_pixels: torch.Tensor,
                  real_slots: torch.Tensor | None = None, *, patches: bool = False) -> torch.Tensor:
    """(batch, subjects, 3, size, size), normalised for the image encoder -> (batch, subjects, image_dim),
    or with ``patches`` (batch, subjects, 1 + patches, image_dim): the pooled embedding, then each patch's
    last hidden state through the same post-layernorm and projection (so both live in CLIP's joint space).

    real_slots: flat indices into (batch * subjects) of the slots that hold a subject
    (``real_subject_slots``); only those are encoded, the padding slots get zeros (no subject token
    reads them). None encodes every slot.
    """
    batch, subjects = subject_pixels.shape[:2]
    flat = subject_pixels.flatten(0, 1).to(image_encoder.dtype)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        output = image_encoder(pixel_values=pixels)
        if not patches:
            return output.image_embeds
        patch_states = image_encoder.vision_model.post_layernorm(output.last_hidden_state[:, 1:])
        return torch.cat([output.image_embeds[:, None], image_encoder.visual_projection(patch_states)], dim=1)

    if real_slots is None:
        features = encode(flat)
    else:
        config = image_encoder.config
        shape = (config.projection_dim,) if not patches else (1 + (config.image_size // config.patch_size) ** 2,
                                                               config.projection_dim)
        features = flat.new_zeros(batch * subjects, *shape)
        if real_slots.numel():
            encoded = encode(flat.index_select(0, real_slots))
            features = features.to(encoded.dtype).index_copy(0, real_slots, encoded)
    return features.view(batch, subjects, *features.shape[1:])


class MoAModel(nn.Module):
    """Frozen prior (VAE, text encoder, U-Net host layers, image encoder) + trainable MoA parts
    (personalized experts and routers inside the U-Net, and the multimodal prompt encoder).

    image_encoder_trainable_layers: 0 keeps the image encoder frozen; N > 0 also trains the last N
        transformer layers of its vision tower with its post-layernorm and projection (FastComposer
        trains the last 2). Those weights then belong to the MoA weights (export and checkpoints).
    tokens_per_subject: subject tokens made from each subject image (the paper: 1, in place of its
        word; more are appended to the personalized expert's condition, see ``personalize_text``).
    patch_tokens: also one token per image patch, appended the same way (not the paper; see
        ``MultimodalPromptEncoder``).
    """

    def __init__(self, *, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, image_encoder: CLIPVisionModelWithProjection, noise_scheduler: DDPMScheduler,
                 subject_image_spec: SubjectImageSpec, moa_config: MoAConfig | Mapping = MoAConfig(),
                 spacetime: bool = True, image_encoder_trainable_layers: int = 0, tokens_per_subject: int = 1,
                 patch_tokens: bool = False):
        super().__init__()
        moa_config = moa_config if isinstance(moa_config, MoAConfig) else MoAConfig(**moa_config)
        self.moa_config = moa_config
        self.spacetime = spacetime
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.subject_image_spec = subject_image_spec
        self.vae, self.text_encoder, self.image_encoder = vae, text_encoder, image_encoder
        for frozen in (vae, text_encoder, image_encoder):
            frozen.requires_grad_(False).eval()
        self.image_encoder_trainable_layers = image_encoder_trainable_layers
        for module in trainable_image_encoder_parts(image_encoder, image_encoder_trainable_layers):
            module.requires_grad_(True)
        self.unet = unet
        install_moa(unet, moa_config)
        self.prompt_encoder = MultimodalPromptEncoder(
            image_dim=image_encoder.config.projection_dim, text_dim=text_encoder.config.hidden_size,
            num_blocks=moa_config.num_transformer_blocks, spacetime=spacetime, tokens_per_subject=tokens_per_subject,
            patch_tokens=patch_tokens,
        )
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(
                f"text encoder width {text_encoder.config.hidden_size} != U-Net cross_attention_dim "
                f"{unet.config.cross_attention_dim}: base model components do not belong together"
            )

    @classmethod
    def from_pretrained(cls, base_model: str | os.PathLike, image_encoder: str | os.PathLike, *,
                        moa_config: MoAConfig | Mapping | None = None, spacetime: bool = True,
                        moa_weights: str | os.PathLike | None = None, base_model_config: str | None = None,
                        image_encoder_trainable_layers: int = 0, tokens_per_subject: int = 1,
                        patch_tokens: bool = False) -> MoAModel:
        """Load an SD1.5-family base and a CLIP vision model, install MoA, optionally load MoA weights.

        base_model: a diffusers folder or hub id, or a single ``.safetensors``/``.ckpt`` checkpoint
            (community models such as AbsoluteReality), read with diffusers' single-file loader.
        base_model_config: for a single-file base, the diffusers folder or hub id whose component
            configs and tokenizer it uses (default: ``runwayml/stable-diffusion-v1-5``).
        moa_weights: a folder written by ``export_moa`` (weights + config), loaded on top.
        """
        check_pretrained_path(base_model, option="base_model", expect="a diffusers Stable Diffusion folder or a "
                                                                      "single-file checkpoint")
        check_pretrained_path(image_encoder, option="image_encoder", expect="a CLIP vision model folder")
        if moa_weights is not None:
            check_pretrained_path(moa_weights, option="moa_weights", expect=f"a folder with {EXPORT_WEIGHTS}")
            saved = json.loads((Path(moa_weights) / EXPORT_CONFIG).read_text())
            moa_config, spacetime = saved["moa_config"], saved["spacetime"]
            image_encoder_trainable_layers = saved.get("image_encoder_trainable_layers", 0)
            tokens_per_subject = saved.get("tokens_per_subject", 1)
            patch_tokens = saved.get("patch_tokens", False)
        model = cls(**load_base_components(base_model, base_model_config),
                    image_encoder=load_image_encoder(image_encoder),
                    subject_image_spec=SubjectImageSpec.from_pretrained(image_encoder),
                    moa_config=moa_config or MoAConfig(), spacetime=spacetime,
                    image_encoder_trainable_layers=image_encoder_trainable_layers,
                    tokens_per_subject=tokens_per_subject, patch_tokens=patch_tokens)
        if moa_weights is not None:
            model.load_trainable_state_dict(load_file(Path(moa_weights) / EXPORT_WEIGHTS))
        return model

    # ---- trainable state -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_parts(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by part, for per-part learning rates: ``experts`` (copies of the
        prior's attention, the personalized branch), ``routers`` (new), ``prompt_encoder`` (new) and
        ``image_encoder`` (its trainable last layers; empty when frozen)."""
        parts: dict[str, list[nn.Parameter]] = {"experts": [], "routers": [], "prompt_encoder": [], "image_encoder": []}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            part = next((p for p in ("image_encoder", "prompt_encoder") if name.startswith(p + ".")), None)
            parts[part or ("routers" if ".router." in name else "experts")].append(parameter)
        return parts

    def image_encoder_trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The image encoder's trained parameters (empty when it is frozen), by their names in it."""
        return {name: p for name, p in self.image_encoder.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """MoA weights only: ``unet.<layer>.<param>``, ``prompt_encoder.<param>`` and, when some of its
        layers train, ``image_encoder.<param>``."""
        state = {f"unet.{k}": v for k, v in moa_state_dict(self.unet).items()}
        state.update({f"prompt_encoder.{k}": v for k, v in self.prompt_encoder.state_dict().items()})
        state.update({f"image_encoder.{k}": v for k, v in self.image_encoder_trainable_state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_moa_state_dict(self.unet, {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
        self.prompt_encoder.load_state_dict(
            {k[len("prompt_encoder."):]: v for k, v in state.items() if k.startswith("prompt_encoder.")}
        )
        encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
        expected = set(self.image_encoder_trainable_state_dict())
        if set(encoder_state) != expected:
            raise MoALayoutError(f"MoA weights hold {len(encoder_state)} image-encoder tensors, this model trains "
                                 f"{len(expected)} (image_encoder_trainable_layers={self.image_encoder_trainable_layers})")
        self.image_encoder.load_state_dict(encoder_state, strict=False)

    def export_moa(self, out_dir: str | os.PathLike) -> Path:
        """Write ``moa.safetensors`` and ``moa_config.json`` (what is needed to rebuild the layers)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trainable_state_dict().items()}
        with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
            save_file(tensors, tmp)
        config = {"moa_config": self.moa_config.to_dict(), "spacetime": self.spacetime,
                  "image_encoder_trainable_layers": self.image_encoder_trainable_layers,
                  "tokens_per_subject": self.prompt_encoder.tokens_per_subject,
                  "patch_tokens": self.prompt_encoder.patch_tokens,
                  "text_dim": self.text_encoder.config.hidden_size,
                  "image_dim": self.image_encoder.config.projection_dim}
        write_text(out_dir / EXPORT_CONFIG, json.dumps(config, indent=2) + "\n")
        return out_dir

    # ---- conditioning ----------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) -> (batch, tokens, text_dim), the frozen text encoder's last hidden state."""
        return self.text_encoder(input_ids)[0]

    def encode_subjects(self, subject_pixels: torch.Tensor, real_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``encode_images`` with this model's image encoder, with patch features when its prompt encoder
        makes patch tokens. Differentiable: the caller decides whether gradients are needed (``torch.no_grad``)."""
        return encode_images(self.image_encoder, subject_pixels, real_slots, patches=self.prompt_encoder.patch_tokens)

    def moa_inputs(self, text_embeddings: torch.Tensor, *, timesteps: torch.Tensor,
                   subject_features: torch.Tensor | None = None, subject_token_index: torch.Tensor | None = None,
                   subject_valid: torch.Tensor | None = None, record_router_layers: frozenset[str] = frozenset(),
                   record_attention_layers: frozenset[str] = frozenset(),
                   record_influence_layers: frozenset[str] = frozenset()) -> MoAInputs:
        """Build the per-forward MoA inputs.

        text_embeddings (batch, tokens, text_dim); timesteps (batch,); subject_features
        (batch, subjects, [1 + patches,] image_dim) from ``encode_subjects``, subject_token_index /
        subject_valid (batch, subjects). Without subjects the personalized expert sees the plain text.
        """
        if subject_features is None or subject_features.shape[1] == 0:
            return MoAInputs(personalized_condition=text_embeddings[:, None],
                             record_router_layers=record_router_layers,
                             record_influence_layers=record_influence_layers)
        words = torch.gather(
            text_embeddings, 1, subject_token_index[..., None].expand(-1, -1, text_embeddings.shape[-1])
        )
        subject_tokens = self.prompt_encoder(subject_features.to(words.dtype), words, timesteps)
        condition, key_mask = personalize_text(text_embeddings, subject_tokens.to(text_embeddings.dtype),
                                               subject_token_index, subject_valid)
        return MoAInputs(personalized_condition=condition, personalized_key_mask=key_mask,
                         subject_token_index=subject_token_index,
                         record_router_layers=record_router_layers, record_attention_layers=record_attention_layers,
                         record_influence_layers=record_influence_layers)
