"""Generation command: ``python -m moa.inference.generate moa_weights=... [requests=...]`` (config: conf/generate.yaml).

Every image is written with a JSON record of what made it: prompt, seed, subjects (with file hashes),
scheduler and its config, and hashes of the base model and MoA weights, so it can be regenerated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moa.checks import ConfigError, check_guidance, exit_on_config_error
from moa.config import CONFIG_DIR
from moa.files import save_image, write_text

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str | None:
    """sha256 of a file, or of every weight/config file under a folder; None for a hub id."""
    path = Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                                                 (".safetensors", ".bin", ".json", ".txt", ".ckpt"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def generate(cfg: DictConfig) -> list[dict]:
    """Generate every request of ``cfg``; returns the records written to ``generation.json``."""
    import torch

    from moa.inference.pipeline import MoAPipeline, Subject, scheduler_from_name
    from moa.inference.visualize import router_map_figure
    from moa.models.model import EXPORT_WEIGHTS, MoAModel
    from moa.pretrained import check_pretrained_path

    check_guidance(cfg)
    try:
        check_pretrained_path(cfg.moa_weights, option="moa_weights", expect="a folder written by train.py's export")
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    requests = OmegaConf.to_container(cfg.requests, resolve=True)
    for index, request in enumerate(requests):
        if not isinstance(request.get("prompt"), str) or not isinstance(request.get("seed"), int):
            raise ConfigError(f"requests[{index}]: needs a string 'prompt' and an integer 'seed', got {request}")
        for subject in request.get("subjects") or []:
            if not Path(subject["image"]).exists():
                raise ConfigError(f"requests[{index}].subjects: image {subject['image']!r} does not exist")

    model = MoAModel.from_pretrained(cfg.base_model, cfg.image_encoder, moa_weights=cfg.moa_weights,
                                     base_model_config=cfg.base_model_config)
    pipe = MoAPipeline.from_moa_model(model, scheduler=scheduler_from_name(cfg.scheduler, model.noise_scheduler.config))
    pipe.to(cfg.device)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"base_model": str(cfg.base_model), "base_model_sha256": file_digest(cfg.base_model),
              "image_encoder": str(cfg.image_encoder), "image_encoder_sha256": file_digest(cfg.image_encoder),
              "moa_weights": str(cfg.moa_weights), "moa_weights_sha256": file_digest(Path(cfg.moa_weights) / EXPORT_WEIGHTS),
              "scheduler": cfg.scheduler, "scheduler_config": dict(pipe.scheduler.config),
              "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
              "subject_guidance_scale": cfg.subject_guidance_scale}
    records = []
    for index, request in enumerate(requests):
        subjects = [Subject(s["image"], s["word"]) for s in request.get("subjects") or []]
        generator = torch.Generator(device=cfg.device).manual_seed(int(request["seed"]))
        output = pipe(request["prompt"], subjects or None, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, subject_guidance_scale=cfg.subject_guidance_scale,
                      height=cfg.height, width=cfg.width, generator=[generator],
                      record_router_maps=cfg.record_router_maps)
        name = f"{index:04d}_seed{request['seed']}"
        save_image(output.images[0], out_dir / f"{name}.png")
        if output.router_maps:
            latent = output.images[0].height // pipe.vae_scale_factor, output.images[0].width // pipe.vae_scale_factor
            save_image(router_map_figure(output.images[0], output.router_maps, latent_size=latent,
                                         title=request["prompt"]),
                       out_dir / f"{name}_router_maps.png")
        records.append({"image": f"{name}.png", "prompt": request["prompt"], "seed": int(request["seed"]),
                        "subjects": [{"image": str(s.image), "word": s.word, "sha256": file_digest(s.image)}
                                     for s in subjects]})
        # Rewritten after every image, so an interrupted run still says how each finished image was made.
        write_text(out_dir / "generation.json", json.dumps({**common, "images": records}, indent=2, default=str) + "\n")
        log.info("wrote %s", out_dir / f"{name}.png")
    return records


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
