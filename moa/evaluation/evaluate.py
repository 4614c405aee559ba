"""Evaluate MoA on the paper's protocol: identity, prompt consistency, disentanglement, diversity.

    python evaluate.py ckpt_path=outputs/tiny/runs/<time>/checkpoints/last.ckpt \
        subsample.subjects=2 subsample.prompts=1 num_inference_steps=10 metrics.identity.allow_random_weights=true

Images are generated once into the run directory (``images/<subject>/<prompt>_seed<k>.png``) and
reused when the command is run again, so an interrupted evaluation resumes where it stopped.
``evaluate.py`` and ``python -m moa.evaluation`` both call ``main``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moa.checks import ConfigError, Range, check_guidance, check_ranges, exit_on_config_error
from moa.config import CONFIG_DIR
from moa.files import remove_partials, save_image, write_text

log = logging.getLogger(__name__)


def protocol_prompts(protocol, limit: int | None) -> list[tuple[int, str]]:
    """(index, template) pairs: the first ``limit`` prompts of every category (all when None)."""
    chosen, index = [], 0
    for templates in protocol.raw["prompt_templates"].values():
        for position, template in enumerate(templates):
            if limit is None or position < limit:
                chosen.append((index, template))
            index += 1
    return chosen


EVALUATION_RANGES = {
    "num_inference_steps": Range(True, 1, None, "a positive number of denoising steps"),
    "subsample.subjects": Range(True, 1, None, "a positive number of subjects, or null for all", nullable=True),
    "subsample.prompts": Range(True, 1, None, "a positive number of prompts per category, or null for all",
                               nullable=True),
    "grid_prompts": Range(True, 0, None, "0 or more prompts per grid"),
}


def check_evaluation_config(cfg: DictConfig) -> None:
    """Everything that can be checked before a model loads or an image is generated (a second or less)."""
    check_ranges(cfg, EVALUATION_RANGES)
    check_guidance(cfg)
    if not cfg.seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds or [])!r}: expected a non-empty list of integers")
    if bool(cfg.ckpt_path) == bool(cfg.moa_weights):
        raise ConfigError("set exactly one of ckpt_path (a train.py checkpoint) or moa_weights (an exported folder)")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    if cfg.moa_weights and not Path(cfg.moa_weights).is_dir():
        raise ConfigError(f"moa_weights={cfg.moa_weights!r}: no such folder (expected train.py's export_dir)")
    weights = cfg.metrics.identity.weights
    if weights is None and not cfg.metrics.identity.allow_random_weights:
        raise ConfigError("metrics.identity.weights is not set: give facenet-pytorch's VGGFace2 weights file, "
                          "'download', or metrics.identity.allow_random_weights=true for a test-only run")
    if weights not in (None, "download") and not Path(weights).is_file():
        raise ConfigError(f"metrics.identity.weights={weights!r}: no such file (expected facenet-pytorch's "
                          "20180402-114759-vggface2.pt, or 'download')")


def load_model(cfg: DictConfig):
    from moa.models.model import MoAModel
    from moa.training.checkpoints import model_from_checkpoint

    if cfg.ckpt_path:
        return model_from_checkpoint(cfg.ckpt_path)
    return MoAModel.from_pretrained(cfg.base_model, cfg.image_encoder, moa_weights=cfg.moa_weights,
                                    base_model_config=cfg.base_model_config)


def generate_grid(cfg: DictConfig, pipe, protocol, subjects: list[str], prompts: list[tuple[int, str]],
                  out_dir: Path) -> None:
    """Every (subject, prompt) x seeds image, plus prior-only images and estimated subject regions;
    anything already on disk is kept."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from moa.evaluation.metrics import subject_region
    from moa.inference.pipeline import Subject
    from moa.inference.visualize import router_map_figure

    remove_partials(out_dir / "images", recursive=True)
    jobs = [(s, i, t) for s in subjects for i, t in prompts]
    jobs += [("prior", i, t, w) for w in sorted({protocol.class_token[s] for s in subjects}) for i, t in prompts]
    for job in tqdm(jobs, desc="generating protocol images"):
        subject, index, template = job[:3]
        word = job[3] if subject == "prior" else protocol.class_token[subject]
        folder = out_dir / "images" / (f"prior_{word}" if subject == "prior" else subject)
        paths = [folder / f"{index:02d}_seed{seed}.png" for seed in cfg.seeds]
        if all(readable_image(p) for p in paths):
            continue
        prompt = template.format(c=word)
        subjects_arg = None if subject == "prior" else [[Subject(protocol.reference_image(subject), word)]] * len(paths)
        generators = [torch.Generator(device=cfg.device).manual_seed(int(seed)) for seed in cfg.seeds]
        output = pipe([prompt] * len(paths), subjects_arg, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, subject_guidance_scale=cfg.subject_guidance_scale,
                      height=cfg.height, width=cfg.width, generator=generators, record_router_maps=subject != "prior")
        for k, (image, path) in enumerate(zip(output.images, paths)):
            if subject != "prior":
                maps = {name: m[:, k] for name, m in output.router_maps.items()}
                boxes = None
                if not maps:  # no router (no_moa ablation): fall back to the detected face
                    boxes = face_boxes(image)
                region = subject_region(maps or None, image_size=(image.height, image.width), face_boxes=boxes)
                save_image(Image.fromarray((region[0, 0].numpy() * 255).astype("uint8")), region_path(path))
            save_image(image, path)  # the image last, so a present image means its region is there too
        if subject != "prior" and index == prompts[0][0] and output.router_maps:
            # Fig. 6 for each subject's first prompt and seed, beside its grid
            latent = (output.images[0].height // pipe.vae_scale_factor, output.images[0].width // pipe.vae_scale_factor)
            save_image(router_map_figure(output.images[0], output.router_maps, latent_size=latent, title=prompt),
                       out_dir / "grids" / f"{subject}_router_maps.png")


def region_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + "_region.png")


def readable_image(path: Path) -> bool:
    """Whether an earlier run left a complete image (and, for a subject image, its region) at ``path``.
    Every image is written atomically, so a damaged file means outside interference: it is redone."""
    from PIL import Image

    if not path.exists():
        return False
    for file in [path] + ([region_path(path)] if region_path(path).exists() else []):
        try:
            with Image.open(file) as image:
                image.load()
        except OSError as error:
            log.warning("%s is unreadable (%s): generating it again", file, error)
            return False
    return True


@functools.cache
def _face_detector():
    from facenet_pytorch import MTCNN

    from moa.evaluation.metrics import MTCNN_SETTINGS

    return MTCNN(**MTCNN_SETTINGS)


def face_boxes(image):
    """(n, 4) xyxy boxes of the faces MTCNN finds in ``image`` (None when there are none)."""
    return _face_detector().detect(image)[0]


def compute_metrics(cfg: DictConfig, protocol, subjects: list[str], prompts: list[tuple[int, str]],
                    out_dir: Path, clip_model: str) -> tuple[dict[str, float], dict[str, Any]]:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from moa.evaluation.metrics import (
        Disentanglement,
        IdentityPreservation,
        LayoutDiversity,
        PromptConsistency,
        pil_to_tensor,
    )

    identity = IdentityPreservation(**cfg.metrics.identity)
    consistency = PromptConsistency(model=clip_model)
    diversity, prior_diversity = LayoutDiversity(), LayoutDiversity()
    versus_prior, swap = Disentanglement(), Disentanglement()

    def load(folder: str, index: int) -> tuple[list, torch.Tensor, torch.Tensor | None]:
        paths = [out_dir / "images" / folder / f"{index:02d}_seed{seed}.png" for seed in cfg.seeds]
        images = [Image.open(p).convert("RGB") for p in paths]
        regions = [region_path(p) for p in paths]
        region = None
        if all(r.exists() for r in regions):
            region = torch.stack([pil_to_tensor([Image.open(r).convert("RGB")])[0, :1] for r in regions]).round()
        return images, pil_to_tensor(images), region

    for subject in tqdm(subjects, desc="scoring"):
        word = protocol.class_token[subject]
        reference = identity.reference_embedding(Image.open(protocol.reference_image(subject)).convert("RGB"))
        for index, template in prompts:
            images, pixels, region = load(subject, index)
            identity.update(images, reference[None].expand(len(images), -1))
            consistency.update(images, [template.format(c=word)] * len(images))
            diversity.update(pixels)
            _, prior_pixels, _ = load(f"prior_{word}", index)
            versus_prior.update(pixels, prior_pixels, region)
    for word in sorted({protocol.class_token[s] for s in subjects}):
        for index, _ in prompts:
            prior_diversity.update(load(f"prior_{word}", index)[1])
    # Subject swaps: two subjects bound to the same word, same prompt and seed; region = union of both.
    for a, b in itertools.combinations(subjects, 2):
        if protocol.class_token[a] != protocol.class_token[b]:
            continue
        for index, _ in prompts:
            _, pixels_a, region_a = load(a, index)
            _, pixels_b, region_b = load(b, index)
            swap.update(pixels_a, pixels_b, torch.maximum(region_a, region_b))

    results = {**identity.compute(), **consistency.compute(), **diversity.compute(),
               "prior_diversity": prior_diversity.compute()["diversity"],
               **{f"vs_prior_{k}": v for k, v in versus_prior.compute().items()}}
    if swap.outside_pixels > 0:
        results.update({f"swap_{k}": v for k, v in swap.compute().items()})
    metrics = {k: float(v) for k, v in results.items()}
    provenance = {"identity_weights": identity.weights_label, "prompt_consistency_model": consistency.model_name,
                  "identity_is_test_only": identity.weights_label.startswith("RANDOM")}
    return metrics, provenance


def write_report(metrics: dict[str, float], provenance: dict, info: dict, out_dir: Path) -> None:
    descriptions = {
        "identity": "identity preservation (FaceNet cosine, 0 if no face)", "no_face_rate": "no face detected",
        "prompt_consistency": "prompt consistency (CLIP cosine)", "clip_score": "CLIPScore (max(100 cos, 0))",
        "diversity": "layout diversity (1 - MS-SSIM across seeds)", "prior_diversity": "same, prior-only images",
        "vs_prior_psnr_outside": "vs prior-only: PSNR outside subject (dB)", "vs_prior_mae_outside":
        "vs prior-only: mean abs error outside", "vs_prior_psnr_inside": "vs prior-only: PSNR inside subject (dB)",
        "vs_prior_mae_inside": "vs prior-only: mean abs error inside", "swap_psnr_outside":
        "subject swap: PSNR outside subjects (dB)", "swap_mae_outside": "subject swap: mean abs error outside",
        "swap_psnr_inside": "subject swap: PSNR inside subjects (dB)", "swap_mae_inside":
        "subject swap: mean abs error inside",
    }
    warning = ""
    if provenance["identity_is_test_only"]:
        warning = f"\n**Identity uses {provenance['identity_weights']}.**\n"
    lines = ["# MoA evaluation", "", f"{info['images']} images; weights: {info['weights']}", warning,
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {descriptions.get(k, k)} | {'inf' if math.isinf(v) else f'{v:.4f}'} |" for k, v in metrics.items()]
    lines += ["", f"Identity model: {provenance['identity_weights']}",
              f"Prompt-consistency model: {provenance['prompt_consistency_model']}"]
    write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    payload = {"metrics": {k: (None if math.isinf(v) else v) for k, v in metrics.items()},
               "infinite": [k for k, v in metrics.items() if math.isinf(v)], **provenance, **info}
    write_text(out_dir / "results.json", json.dumps(payload, indent=2) + "\n")


def write_grids(cfg: DictConfig, protocol, subjects: list[str], prompts: list[tuple[int, str]], out_dir: Path) -> list:
    from PIL import Image

    from moa.inference.visualize import image_grid

    grids = []
    shown = prompts[: cfg.grid_prompts]
    for subject in subjects:
        word = protocol.class_token[subject]
        reference = Image.open(protocol.reference_image(subject)).convert("RGB")
        rows, labels = [], []
        for index, _ in shown:
            row = [Image.open(out_dir / "images" / subject / f"{index:02d}_seed{s}.png") for s in cfg.seeds]
            prior = Image.open(out_dir / "images" / f"prior_{word}" / f"{index:02d}_seed{cfg.seeds[0]}.png")
            rows.append([reference.resize(row[0].size), prior, *row])
            labels.append(f"prompt {index}")
        path = out_dir / "grids" / f"{subject}.png"
        save_image(image_grid(rows, labels), path)
        grids.append(path)
    return grids


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from moa.evaluation.protocol import load_protocol

    check_evaluation_config(cfg)
    try:
        protocol = load_protocol(cfg.protocol_dir)
    except FileNotFoundError as error:
        raise ConfigError(f"protocol_dir={cfg.protocol_dir!r}: {error}") from None
    subjects = list(protocol.class_token)[: cfg.subsample.subjects]
    prompts = protocol_prompts(protocol, cfg.subsample.prompts)
    out_dir = Path(cfg.paths.output_dir)

    from moa.inference.pipeline import MoAPipeline, scheduler_from_name

    model = load_model(cfg)
    pipe = MoAPipeline.from_moa_model(model, scheduler=scheduler_from_name(cfg.scheduler, model.noise_scheduler.config))
    pipe.to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    generate_grid(cfg, pipe, protocol, subjects, prompts, out_dir)
    clip_model = cfg.metrics.prompt_consistency.model or model.image_encoder.name_or_path
    del pipe, model

    metrics, provenance = compute_metrics(cfg, protocol, subjects, prompts, out_dir, clip_model)
    info = {"images": len(subjects) * len(prompts) * len(cfg.seeds), "subjects": subjects,
            "prompts": [p for _, p in prompts], "seeds": list(cfg.seeds),
            "weights": str(cfg.ckpt_path or cfg.moa_weights), "config": OmegaConf.to_container(cfg, resolve=True)}
    write_report(metrics, provenance, info, out_dir)
    grids = write_grids(cfg, protocol, subjects, prompts, out_dir)
    if cfg.wandb.enabled:
        import wandb

        run = wandb.init(project=cfg.wandb.project, dir=str(out_dir), mode="offline" if cfg.wandb.offline else "online",
                         job_type="evaluate", config=info["config"])
        try:
            run.log({**{f"eval/{k}": v for k, v in metrics.items() if not math.isinf(v)},
                     "eval/grids": [wandb.Image(str(g), caption=g.stem) for g in grids]})
            run.summary.update(provenance)
        finally:
            run.finish()
    log.info("results in %s: %s", out_dir / "results.md", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
