"""``MoAPipeline``: Stable Diffusion generation with subjects injected through MoA.

A ``StableDiffusionPipeline`` subclass, so prompt encoding, latent preparation, VAE decoding and LoRA
loading are diffusers' own; only the denoising loop differs, because MoA's personalized condition
depends on the timestep (eq. 8) and has to be rebuilt every step. ControlNet residuals are added to
the U-Net exactly as diffusers' ControlNet pipeline does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, UnidentifiedImageError

from moa.data.subjects import MAX_SUBJECTS, SubjectBindingError, token_positions, word_ends
from moa.data.transforms import SubjectImageSpec, image_to_tensor, mask_bbox, subject_crop
from moa.models.inputs import MoAInputs
from moa.models.model import MoAModel
from moa.models.unet import moa_processors


@dataclass
class Subject:
    """A subject image bound to a word of the prompt ("man", "woman", ...).

    ``image``: a path or a PIL image. ``mask``: optional (H, W) foreground mask of the image's size;
    as in training, the encoder then sees the mask's bounding box with the background replaced by its
    mean colour. Give one: training always crops to the subject and replaces the background, so an
    unmasked subject (the whole image, background included) is input the image encoder and prompt
    encoder never saw; a tight crop of the subject is the next best.
    """

    image: str | os.PathLike | Image.Image
    word: str
    mask: np.ndarray | None = None


@dataclass
class MoAPipelineOutput:
    """images: PIL images (or arrays/tensors per ``output_type``). When asked for, router_maps: layer
    name -> (steps, batch, pixels) prior weight ``R0``, and attention_maps: cross-attention layer name
    -> (steps, batch, pixels, subjects), both of the conditional pass."""

    images: list
    router_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)


def load_subject_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Open a subject image, with an error that names the file when it cannot be read."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"subject image {str(image)!r} cannot be read: {error}") from error


def subject_pixels(subject: Subject, spec: SubjectImageSpec) -> torch.Tensor:
    """The image encoder's input for one subject: (3, size, size), normalised, made as training makes
    it (``FFHQWildDataset``): the box of the subject's mask, background set to the encoder's mean. The
    box matters as much as the mask: the whole frame would show the subject smaller and off-centre."""
    image = load_subject_image(subject.image)
    tensor = image_to_tensor(image)
    if subject.mask is None:
        mask = torch.ones(tensor.shape[1:])
    else:
        mask = torch.as_tensor(np.asarray(subject.mask)).float()
        if tuple(mask.shape) != tuple(tensor.shape[1:]):
            raise ValueError(f"subject {subject.word!r}: mask of shape {tuple(mask.shape)}, expected the image's "
                             f"(H, W) = {tuple(tensor.shape[1:])} (a 2-D foreground mask)")
    box = mask_bbox(mask)
    if box is None:
        raise ValueError(f"subject {subject.word!r}: the mask is empty (expected the subject's pixels as nonzero)")
    return subject_crop(tensor, mask, box, spec)


def scheduler_from_name(name: str, config):
    """Any diffusers scheduler class by name (``UniPCMultistepScheduler``, ``DDIMScheduler``, ...),
    built from ``config`` (the base model's training schedule)."""
    import diffusers

    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ValueError(f"scheduler={name!r}: not a diffusers scheduler class")
    return scheduler_class.from_config(config)


class MoAPipeline(StableDiffusionPipeline):
    """Text-to-image with MoA. Build with ``MoAPipeline.from_moa(...)`` or ``from_moa_model(model)``.

    ``pipe(prompt, subjects=[Subject("me.jpg", "man")])``; without subjects it is the base model
    (prior-only generation), exactly.
    """

    moa: MoAModel

    @classmethod
    def from_moa_model(cls, model: MoAModel, scheduler=None) -> MoAPipeline:
        """Wrap an in-memory ``MoAModel`` (shares its modules; nothing is copied). UniPC by default."""
        scheduler = scheduler or UniPCMultistepScheduler.from_config(model.noise_scheduler.config)
        pipe = cls(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                   image_encoder=model.image_encoder, requires_safety_checker=False)
        pipe.moa = model
        return pipe

    @classmethod
    def from_moa(cls, base_model: str | os.PathLike, image_encoder: str | os.PathLike,
                 moa_weights: str | os.PathLike, scheduler=None) -> MoAPipeline:
        """Load a base model folder, a CLIP vision model and MoA weights written by ``export_moa``."""
        return cls.from_moa_model(MoAModel.from_pretrained(base_model, image_encoder, moa_weights=moa_weights),
                                  scheduler=scheduler)

    def to(self, *args, **kwargs) -> MoAPipeline:
        """Like ``DiffusionPipeline.to``, and the multimodal prompt encoder follows the U-Net (it is
        not a registered pipeline component, so diffusers would leave it behind)."""
        super().to(*args, **kwargs)
        self.moa.prompt_encoder.to(device=self.unet.device, dtype=self.unet.dtype)
        return self

    # ---- inputs ----------------------------------------------------------------------------------

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        encoded = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_offsets_mapping=True)
        return torch.tensor(encoded["input_ids"]), encoded["offset_mapping"]

    def prepare_subjects(self, prompts: list[str], subjects: list[list[Subject]]) -> dict[str, torch.Tensor]:
        """Check and encode subjects before any denoising: (batch, S, ...) tensors, S = most subjects."""
        if len(subjects) != len(prompts):
            raise ValueError(f"{len(subjects)} subject lists for {len(prompts)} prompts")
        _, offsets = self._tokenize(prompts)
        count = max(1, max(len(s) for s in subjects))
        spec = self.moa.subject_image_spec
        pixels = torch.zeros(len(prompts), count, 3, spec.size, spec.size)
        token_index = torch.zeros(len(prompts), count, dtype=torch.long)
        valid = torch.zeros(len(prompts), count, dtype=torch.bool)
        for row, (prompt, row_subjects) in enumerate(zip(prompts, subjects)):
            if len(row_subjects) > MAX_SUBJECTS:
                raise SubjectBindingError(f"at most {MAX_SUBJECTS} subjects per prompt, got {len(row_subjects)}")
            ends = word_ends(prompt, [s.word for s in row_subjects])
            positions = token_positions(offsets[row], ends, prompt)
            for slot, (subject, position) in enumerate(zip(row_subjects, positions)):
                if position is None:
                    raise SubjectBindingError(f"the word {subject.word!r} of {prompt!r} lies beyond the tokenizer's "
                                              f"{self.tokenizer.model_max_length} tokens")
                pixels[row, slot] = subject_pixels(subject, spec)
                token_index[row, slot], valid[row, slot] = position, True
        return {"subject_pixel_values": pixels, "subject_token_index": token_index, "subject_valid": valid}

    # ---- generation ------------------------------------------------------------------------------

    def _control_input(self, control_image, batch: int, height: int, width: int, copies: int) -> torch.Tensor:
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        image = processor.preprocess(control_image, height=height, width=width).to(self._execution_device, self.unet.dtype)
        image = image.repeat_interleave(batch // image.shape[0], dim=0) if image.shape[0] != batch else image
        return torch.cat([image] * copies)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None,
                 subjects: list[Subject] | list[list[Subject]] | None = None, *,
                 negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, subject_guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 prepared_subjects: dict[str, torch.Tensor] | None = None,
                 controlnet: ControlNetModel | None = None, control_image=None,
                 controlnet_conditioning_scale: float = 1.0,
                 record_router_maps: bool = False, record_attention_maps: bool = False) -> MoAPipelineOutput:
        """Generate one image per prompt.

        subjects: for one prompt a list of ``Subject``; for several prompts a list of lists. None or
            empty: prior-only generation (the base model, exactly).
        prompt_embeds: (batch, tokens, dim) text embeddings to use instead of encoding ``prompt``
            (``prompt`` is then still used to bind subjects to tokens).
        subject_guidance_scale: None (the paper): classifier-free guidance between the negative prompt and
            the prompt with its subjects, ``guidance_scale`` times. A number g_s: a third U-Net pass, the
            prompt without its subjects (as the unconditional pass, no subject image), and ``uncond +
            guidance_scale * (text - uncond) + g_s * (subjects - text)``, so the subject images' share is
            scaled on its own (g_s = ``guidance_scale`` is plain guidance; at 0 the subject image no
            longer matters). Needs ``guidance_scale`` > 1; without subjects it changes nothing.
        generator: one per image, so any image of a batch can be regenerated alone.
        prepared_subjects: subject tensors as from ``prepare_subjects`` (``subject_pixel_values``, or
            ``subject_features`` already encoded, plus ``subject_token_index`` and ``subject_valid``).
        controlnet, control_image: any diffusers ``ControlNetModel`` and its condition image(s).
        record_router_maps / record_attention_maps: return every layer's prior weight map, and every
            cross-attention layer's personalized attention at the subject tokens, for each step.
        """
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt=None: give a prompt (a string or a list of strings), or prompt_embeds")
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                                                    and all(isinstance(p, str) for p in prompt))):
            raise TypeError(f"prompt={prompt!r}: expected a string or a non-empty list of strings")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if (subjects or prepared_subjects is not None) and not prompts:
            raise ValueError("subjects are bound to words of the prompt: give prompt too, not only prompt_embeds")
        batch = len(prompts) if prompts else prompt_embeds.shape[0]
        if subjects and isinstance(subjects[0], Subject):
            subjects = [subjects]
        if prepared_subjects is None and subjects and any(subjects):
            prepared_subjects = self.prepare_subjects(prompts, subjects)
        device = self._execution_device
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        guided = guidance_scale > 1.0
        if subject_guidance_scale is not None and not guided:
            raise ValueError(f"subject_guidance_scale={subject_guidance_scale} needs classifier-free guidance: "
                             f"guidance_scale > 1 (got {guidance_scale})")

        prompt_embeds, negative_embeds = self.encode_prompt(prompts or None, device, 1, guided, negative_prompt,
                                                            prompt_embeds=prompt_embeds)
        # The U-Net's batch: [unconditional,] [prompt without subjects (subject guidance),] prompt with subjects.
        subject_guided = subject_guidance_scale is not None and prepared_subjects is not None
        copies = 1 + guided + subject_guided
        text = torch.cat([negative_embeds] + [prompt_embeds] * (copies - 1)) if guided else prompt_embeds
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, prompt_embeds.dtype,
                                       device, generator, latents)
        control = None if controlnet is None else self._control_input(control_image, batch, height, width, copies)

        features = token_index = valid = None
        if prepared_subjects is not None:
            prepared = {k: v.to(device) for k, v in prepared_subjects.items()}
            features = prepared.get("subject_features")
            if features is None:
                features = self.moa.encode_subjects(prepared["subject_pixel_values"])
            token_index, valid = prepared["subject_token_index"], prepared["subject_valid"]
            # only the last copy sees the subjects
            features, token_index = torch.cat([features] * copies), torch.cat([token_index] * copies)
            valid = torch.cat([torch.zeros_like(valid)] * (copies - 1) + [valid])
        processors = moa_processors(self.unet)
        record_router = frozenset(processors) if record_router_maps else frozenset()
        record_attention = frozenset(n for n, p in processors.items() if p.is_cross_attention) \
            if record_attention_maps and features is not None else frozenset()
        router_maps: dict[str, list[torch.Tensor]] = {}
        attention_maps: dict[str, list[torch.Tensor]] = {}

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * copies)
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(device)
            if features is None:  # prior-only generation is the base model: no router, nothing to record
                moa = MoAInputs(prior_only=True)
            else:
                moa = self.moa.moa_inputs(text, timesteps=timesteps, subject_features=features,
                                          subject_token_index=token_index, subject_valid=valid,
                                          record_router_layers=record_router, record_attention_layers=record_attention)
            residuals = {}
            if controlnet is not None:
                down, mid = controlnet(model_input, t, encoder_hidden_states=text, controlnet_cond=control,
                                       conditioning_scale=controlnet_conditioning_scale, return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            noise_pred = self.unet(model_input, t, encoder_hidden_states=text, cross_attention_kwargs={"moa": moa},
                                   return_dict=False, **residuals)[0]
            if subject_guided:
                uncond, without_subjects, cond = noise_pred.chunk(3)
                noise_pred = (uncond + guidance_scale * (without_subjects - uncond)
                              + subject_guidance_scale * (cond - without_subjects))
            elif guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            for store, reported in ((router_maps, moa.router_maps), (attention_maps, moa.subject_attention)):
                for name, value in reported.items():
                    store.setdefault(name, []).append(value[-batch:].float().cpu())

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[True] * decoded.shape[0])
        self.maybe_free_model_hooks()
        return MoAPipelineOutput(images=images, router_maps={k: torch.stack(v) for k, v in router_maps.items()},
                                 attention_maps={k: torch.stack(v) for k, v in attention_maps.items()})
