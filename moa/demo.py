"""A browser demo: upload subjects, type a prompt, compare prior-only and MoA from the same seed.

    python -m moa.demo                                  # the newest outputs/tiny run (python train.py makes one)
    python -m moa.demo moa_weights=<run>/moa_weights base_model=... image_encoder=...

Serves a Gradio page on 127.0.0.1 (``conf/demo.yaml``): up to 4 subjects (image, word, optional mask),
prompt, seed, steps and guidance; prior-only and MoA side by side, the router maps laid over the MoA
image (Fig. 6), and subject swap and morphing tabs. Bad input is reported in the page.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from moa.checks import ConfigError, exit_on_config_error
from moa.config import CONFIG_DIR

log = logging.getLogger(__name__)

MAX_DEMO_SUBJECTS = 4
DISPLAY_SIZE = 256  # small models' images (64 px) are enlarged to this, pixel for pixel, to be seen


def for_display(image: Image.Image) -> Image.Image:
    """``image`` enlarged by a whole factor (nearest neighbour) to at least ``DISPLAY_SIZE`` pixels."""
    factor = -(-DISPLAY_SIZE // min(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def newest_run_weights(runs_dir: str | Path) -> Path:
    """The MoA weights of the newest run under ``runs_dir`` (``<run>/moa_weights``)."""
    found = sorted(Path(runs_dir).glob("*/moa_weights/moa.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"moa_weights=null and no trained run under {runs_dir}: run `python train.py` first "
                          "(about a minute on a CPU), or give moa_weights=<run>/moa_weights")
    return found[-1].parent


class Demo:
    """What the page calls; each method returns images and a message (empty when all went well), so
    bad input becomes a sentence in the page, never a trace."""

    USER_ERRORS = (ValueError, KeyError, OSError)  # SubjectBindingError is a ValueError

    def __init__(self, pipe, *, num_inference_steps: int, guidance_scale: float, layers_shown: int):
        self.pipe = pipe
        self.num_inference_steps, self.guidance_scale, self.layers_shown = num_inference_steps, guidance_scale, layers_shown
        self.device = pipe._execution_device

    @staticmethod
    def subjects(fields: list) -> list:
        """Gradio fields (image, word, mask) x MAX_DEMO_SUBJECTS -> ``Subject`` list (empty rows skipped)."""
        from moa.inference.pipeline import Subject

        subjects = []
        for slot in range(0, len(fields), 3):
            image, word, mask = fields[slot: slot + 3]
            if image is None and not (word or "").strip():
                continue
            if image is None:
                raise ValueError(f"subject {slot // 3 + 1}: the word {word!r} has no image")
            if not (word or "").strip():
                raise ValueError(f"subject {slot // 3 + 1}: give the word of the prompt it is bound to (e.g. man)")
            image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask) if isinstance(mask, np.ndarray) else mask).astype(float)
                mask = (mask.mean(-1) if mask.ndim == 3 else mask) > 127
            subjects.append(Subject(image, word.strip(), mask=mask))
        return subjects

    def _call(self, prompt, subjects, seed, steps, guidance, record: bool):
        import torch

        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return self.pipe(prompt, subjects or None, num_inference_steps=int(steps), guidance_scale=float(guidance),
                         generator=[generator], record_router_maps=record)

    def generate(self, prompt: str, seed: int, steps: int, guidance: float, *fields):
        """-> (prior-only image, MoA image, router overlay, message)."""
        from moa.inference.visualize import router_map_figure

        try:
            subjects = self.subjects(list(fields))
            if not (prompt or "").strip():
                raise ValueError("type a prompt, e.g. 'a man holding a red cup in a park'")
            if not subjects:
                raise ValueError("add at least one subject: an image and the word of the prompt it is bound to")
            prior = self._call(prompt, None, seed, steps, guidance, record=False).images[0]
            moa = self._call(prompt, subjects, seed, steps, guidance, record=True)
            latent = (moa.images[0].height // self.pipe.vae_scale_factor, moa.images[0].width // self.pipe.vae_scale_factor)
            overlay = (router_map_figure(moa.images[0], moa.router_maps, latent_size=latent, max_rows=self.layers_shown,
                                         title=prompt) if moa.router_maps else None)
            return for_display(prior), for_display(moa.images[0]), overlay, ""
        except self.USER_ERRORS as error:
            return None, None, None, f"**Cannot generate:** {error}"

    def swap(self, prompt: str, seed: int, steps: int, guidance: float, *fields):
        """The same prompt and seed with subject A, then subject B -> (image A, image B, message)."""
        from moa.inference.applications import subject_swap

        try:
            subjects = self.subjects(list(fields))
            if len(subjects) != 2:
                raise ValueError("give exactly two subjects, A and B, each with its word in the prompt")
            outputs = subject_swap(self.pipe, prompt, [[subjects[0]], [subjects[1]]], seed=int(seed),
                                   num_inference_steps=int(steps), guidance_scale=float(guidance))
            return for_display(outputs[0].images[0]), for_display(outputs[1].images[0]), ""
        except self.USER_ERRORS as error:
            return None, None, f"**Cannot swap:** {error}"

    def morph(self, prompt: str, seed: int, steps: int, guidance: float, frames: int, *fields):
        """Subject A morphing into B (same word) -> (list of frames, message)."""
        from moa.inference.applications import morph

        try:
            subjects = self.subjects(list(fields))
            if len(subjects) != 2:
                raise ValueError("give exactly two subjects, A and B, bound to the same word")
            alphas = [i / max(1, int(frames) - 1) for i in range(int(frames))]
            outputs = morph(self.pipe, prompt, subjects[0], subjects[1], alphas, seed=int(seed),
                            num_inference_steps=int(steps), guidance_scale=float(guidance))
            return [(for_display(o.images[0]), f"alpha {a:.2f}") for o, a in zip(outputs, alphas)], ""
        except self.USER_ERRORS as error:
            return [], f"**Cannot morph:** {error}"


def build_page(demo: Demo, *, title: str):
    """The Gradio Blocks page over ``demo``."""
    import gradio as gr

    def subject_rows(count: int, prefix: str) -> list:
        fields = []
        for slot in range(count):
            with gr.Row():
                fields.append(gr.Image(label=f"{prefix} {slot + 1}: image", type="pil", height=160,
                                       elem_id=f"{prefix.lower()}-{slot + 1}-image"))
                fields.append(gr.Textbox(label="word in the prompt", placeholder="man",
                                         elem_id=f"{prefix.lower()}-{slot + 1}-word"))
                fields.append(gr.Image(label="mask (optional, white = subject)", type="numpy", height=160,
                                       image_mode="L", elem_id=f"{prefix.lower()}-{slot + 1}-mask"))
        return fields

    def settings(prefix: str) -> list:
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value="a man holding a red cup in a park", elem_id=f"{prefix}-prompt")
            seed = gr.Number(label="seed", value=0, precision=0)
            steps = gr.Slider(1, 100, value=demo.num_inference_steps, step=1, label="steps")
            guidance = gr.Slider(1.0, 15.0, value=demo.guidance_scale, step=0.5, label="guidance")
        return [prompt, seed, steps, guidance]

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nPrior-only and MoA from the same seed: with MoA, only the subject should change.")
        with gr.Tab("Generate"):
            inputs = settings("generate")
            fields = subject_rows(MAX_DEMO_SUBJECTS, "Subject")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            message = gr.Markdown(elem_id="generate-message")
            with gr.Row():
                prior = gr.Image(label="prior only", elem_id="prior-image", height=320)
                moa = gr.Image(label="MoA", elem_id="moa-image", height=320)
            overlay = gr.Image(label="router prior weight over the MoA image (rows: layers, columns: steps)",
                               elem_id="router-overlay")
            run.click(demo.generate, inputs=[*inputs, *fields], outputs=[prior, moa, overlay, message])
        with gr.Tab("Subject swap"):
            inputs = settings("swap")
            fields = subject_rows(2, "Swap")
            run = gr.Button("Swap", variant="primary", elem_id="swap")
            message = gr.Markdown()
            with gr.Row():
                first = gr.Image(label="with subject A", height=320)
                second = gr.Image(label="with subject B", height=320)
            run.click(demo.swap, inputs=[*inputs, *fields], outputs=[first, second, message])
        with gr.Tab("Morph"):
            inputs = settings("morph")
            frames = gr.Slider(2, 9, value=5, step=1, label="frames")
            fields = subject_rows(2, "Morph")
            run = gr.Button("Morph", variant="primary", elem_id="morph")
            message = gr.Markdown()
            gallery = gr.Gallery(label="A -> B", columns=5)
            run.click(demo.morph, inputs=[*inputs, frames, *fields], outputs=[gallery, message])
    return page


def launch(cfg: DictConfig, *, block: bool = True):
    """Load the model named by ``cfg`` and serve the page; returns the Gradio app (``block=False``)."""
    from moa.inference.pipeline import MoAPipeline
    from moa.models.model import MoAModel
    from moa.pretrained import check_pretrained_path

    weights = Path(cfg.moa_weights) if cfg.moa_weights else newest_run_weights(cfg.runs_dir)
    for option, value in (("moa_weights", weights), ("base_model", cfg.base_model), ("image_encoder", cfg.image_encoder)):
        try:
            check_pretrained_path(value, option=option, expect="a trained run's export, or a model folder")
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
    log.info("loading MoA weights %s on %s", weights, cfg.base_model)
    pipe = MoAPipeline.from_moa_model(MoAModel.from_pretrained(cfg.base_model, cfg.image_encoder, moa_weights=weights,
                                                               base_model_config=cfg.base_model_config))
    pipe.to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    demo = Demo(pipe, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                layers_shown=cfg.layers_shown)
    page = build_page(demo, title=f"MoA: {weights}")
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=not block,
                        share=False, show_error=False)
    return page


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    launch(cfg)


if __name__ == "__main__":
    main()
