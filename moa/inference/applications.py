"""The paper's applications (Sec. 5, App. E), each a small function over ``MoAPipeline``.

ControlNet and style LoRAs need no function of their own: pass ``controlnet=``/``control_image=`` to
the pipeline, and load a LoRA with diffusers' ``pipe.load_lora_weights(...)``. A LoRA lands on the
host attention projections, which are the prior expert; the personalized experts and routers keep
their names apart, so the LoRA never touches them, and ``pipe.unload_lora_weights()`` restores the
previous outputs exactly.
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from PIL import Image

from moa.inference.pipeline import MoAPipeline, MoAPipelineOutput, Subject
from moa.models.inputs import MoAInputs


def _generators(seed: int, count: int, device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(count)]


def subject_swap(pipe: MoAPipeline, prompt: str, subject_sets: list[list[Subject] | None], *, seed: int,
                 **kwargs) -> list[MoAPipelineOutput]:
    """The same prompt and seed with each set of subjects (None: prior-only). With MoA only the
    subject pixels should change between the results (paper Fig. 7, 9)."""
    return [pipe(prompt, subjects or None, generator=_generators(seed, 1, pipe._execution_device), **kwargs)
            for subjects in subject_sets]


def consistent_characters(pipe: MoAPipeline, prompts: list[str], subjects: list[Subject], *, seed: int,
                          **kwargs) -> MoAPipelineOutput:
    """One character (or cast) across several prompts (paper Fig. 23): the same subjects in each."""
    return pipe(prompts, [subjects] * len(prompts), generator=_generators(seed, len(prompts), pipe._execution_device),
                **kwargs)


def morph(pipe: MoAPipeline, prompt: str, subject_a: Subject, subject_b: Subject, alphas: list[float], *, seed: int,
          **kwargs) -> list[MoAPipelineOutput]:
    """Subject morphing (paper Fig. 12): interpolate the image features of two subjects bound to the
    same word. ``alpha = 0`` is subject A alone, ``alpha = 1`` subject B alone."""
    if subject_a.word != subject_b.word:
        raise ValueError(f"morphing needs both subjects on the same word, got {subject_a.word!r} and {subject_b.word!r}")
    prepared_a = pipe.prepare_subjects([prompt], [[subject_a]])
    prepared_b = pipe.prepare_subjects([prompt], [[subject_b]])
    device = pipe._execution_device
    with torch.no_grad():
        feature_a = pipe.moa.encode_subjects(prepared_a["subject_pixel_values"].to(device))
        feature_b = pipe.moa.encode_subjects(prepared_b["subject_pixel_values"].to(device))
    outputs = []
    for alpha in alphas:
        prepared = {"subject_features": torch.lerp(feature_a, feature_b, float(alpha)),
                    "subject_token_index": prepared_a["subject_token_index"], "subject_valid": prepared_a["subject_valid"]}
        outputs.append(pipe(prompt, prepared_subjects=prepared, generator=_generators(seed, 1, device), **kwargs))
    return outputs


def time_lapse(pipe: MoAPipeline, template: str, word_a: str, word_b: str, subject: Subject, alphas: list[float], *,
               seed: int, **kwargs) -> list[MoAPipelineOutput]:
    """Time lapse (paper Fig. 22): ``template`` has ``{}`` where the word goes, e.g. "a photo of a {}";
    the text embeddings of the prompt with ``word_a`` and with ``word_b`` are interpolated while the
    subject stays injected on that word."""
    prompt_a, prompt_b = template.format(word_a), template.format(word_b)
    ids_a, ids_b = (pipe._tokenize([p])[0] for p in (prompt_a, prompt_b))
    prepared_a = pipe.prepare_subjects([prompt_a], [[Subject(subject.image, word_a, subject.mask)]])
    prepared_b = pipe.prepare_subjects([prompt_b], [[Subject(subject.image, word_b, subject.mask)]])
    if not torch.equal(prepared_a["subject_token_index"], prepared_b["subject_token_index"]) or ids_a.shape != ids_b.shape:
        raise ValueError(f"{word_a!r} and {word_b!r} must tokenize to the same position in {template!r}")
    device = pipe._execution_device
    with torch.no_grad():
        text_a = pipe.moa.encode_text(ids_a.to(device))
        text_b = pipe.moa.encode_text(ids_b.to(device))
    return [pipe(prompt_a, prompt_embeds=torch.lerp(text_a, text_b, float(alpha)), prepared_subjects=prepared_a,
                 generator=_generators(seed, 1, device), **kwargs) for alpha in alphas]


@torch.no_grad()
def ddim_invert(pipe: MoAPipeline, image: Image.Image | torch.Tensor, prompt: str, *, num_inference_steps: int = 50,
                height: int | None = None, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion of a real photo with the prior (no subject, no guidance).

    Returns (inverted noise latents, the photo's clean latents), both (1, 4, h, w).
    """
    device = pipe._execution_device
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device, pipe.vae.dtype)
    clean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    text, _ = pipe.encode_prompt(prompt, device, 1, False)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=device)
    latents = clean
    for t in pipe.progress_bar(inverse.timesteps):
        noise = pipe.unet(latents, t, encoder_hidden_states=text,
                          cross_attention_kwargs={"moa": MoAInputs(prior_only=True)}).sample
        latents = inverse.step(noise, t, latents).prev_sample
    return latents, clean


def real_image_subject_swap(pipe: MoAPipeline, image: Image.Image, prompt: str, subjects: list[Subject], *,
                            num_inference_steps: int = 50, **kwargs) -> MoAPipelineOutput:
    """Swap the person in a real photo (paper Fig. 13): DDIM-invert it with ``prompt`` (e.g. "a person"
    or "a person and a person"), then regenerate from the inverted noise with the new subjects bound
    to the words of ``prompt``. Uses DDIM for both directions and no guidance, as inversion needs."""
    inverted, _ = ddim_invert(pipe, image, prompt, num_inference_steps=num_inference_steps)
    previous = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(previous.config)
    try:
        return pipe(prompt, subjects, latents=inverted, num_inference_steps=num_inference_steps, guidance_scale=1.0,
                    **kwargs)
    finally:
        pipe.scheduler = previous
