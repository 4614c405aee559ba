"""Cached VAE latents: encode every training image once instead of in every step.

The VAE encoding of a 512x512 image costs 1117 GFLOP, a third of a MoA training step's FLOPs
(``python -m moa.bench``). Like kohya-ss sd-scripts' ``cache_latents``, this writes each image's
latent distribution once, as ``<id>_latent<R>.npy`` beside the sample (R: the training resolution)
and ``latent_cache.json`` at the root; ``data.cached_latents=true`` then trains from them, drawing
a new latent from the stored distribution in every step exactly as ``vae.encode(...).latent_dist``
would. Cache the FFHQ-wild folder, then ``moa.data.shards`` packs the caches with their samples.

What it gives up: the target image can no longer be flipped (``data.target_flip_p`` must be 0);
crops are fixed at caching time. The subject-image augmentation is unaffected.

    python -m moa.data.latents --root data/ffhq_wild --base-model runwayml/stable-diffusion-v1-5 --resolution 512
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moa.data.ffhq import CorruptSampleError, read_raw_sample, target_pixels
from moa.data.stores import CACHE_MANIFEST, FolderStore, latent_member
from moa.data.transforms import image_to_tensor
from moa.files import atomic_path, write_text
from moa.pretrained import check_pretrained_path, is_single_file, load_single_file_pipeline

log = logging.getLogger(__name__)


def check_latent_cache(store, *, resolution: int, base_model: str) -> None:
    """Raise, naming the file and what was expected, unless ``store`` holds latents cached at
    ``resolution`` with ``base_model``'s VAE."""
    command = f"python -m moa.data.latents --root <FFHQ-wild folder> --base-model {base_model} --resolution {resolution}"
    try:
        manifest = json.loads(store.read_root(CACHE_MANIFEST))
    except FileNotFoundError:
        raise FileNotFoundError(f"data.cached_latents=true: {store.root} has no {CACHE_MANIFEST}; cache them first "
                                f"({command})") from None
    if manifest.get("resolution") != resolution or manifest.get("base_model") != str(base_model):
        raise ValueError(f"data.cached_latents=true: {store.root}/{CACHE_MANIFEST} holds latents of resolution "
                         f"{manifest.get('resolution')} from {manifest.get('base_model')!r}, this run needs "
                         f"resolution {resolution} from {str(base_model)!r} ({command})")


def load_vae(base_model: str | os.PathLike):
    """The VAE of a diffusers folder or hub id, or of a single-file checkpoint (read as training reads it)."""
    from diffusers import AutoencoderKL

    if is_single_file(base_model):
        return load_single_file_pipeline(base_model).vae
    return AutoencoderKL.from_pretrained(base_model, subfolder="vae")


@torch.no_grad()
def cache_latents(root: str | os.PathLike, *, base_model: str, resolution: int, batch_size: int = 16,
                  device: str | None = None) -> Path:
    """Encode every image of the FFHQ-wild folder ``root`` (split ``all``) with ``base_model``'s VAE and
    write its latent distribution (mean and log-variance, (8, R/8, R/8) float32) beside it. Corrupt
    samples are skipped with a warning (training skips them too)."""
    check_pretrained_path(base_model, option="--base-model", expect="a diffusers Stable Diffusion folder or a "
                                                                    "single-file checkpoint")
    store = FolderStore(root)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(base_model).to(device).eval()
    ids = store.split("all")
    for first in tqdm(range(0, len(ids), batch_size), desc="caching latents"):
        batch_ids, pixels = [], []
        for image_id in ids[first: first + batch_size]:
            try:
                pixels.append(target_pixels(image_to_tensor(read_raw_sample(store, image_id).image), resolution))
                batch_ids.append(image_id)
            except CorruptSampleError as error:
                log.warning("not caching %s: %s", image_id, error)
        if not batch_ids:
            continue
        moments = vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist.parameters.float().cpu()
        for image_id, sample_moments in zip(batch_ids, moments):
            name, extension = latent_member(image_id, resolution)
            buffer = io.BytesIO()
            np.save(buffer, sample_moments.numpy())
            with atomic_path(store.root / image_id[:5] / f"{name}.{extension}") as tmp:
                Path(tmp).write_bytes(buffer.getvalue())
    write_text(store.root / CACHE_MANIFEST, json.dumps({"resolution": resolution, "base_model": str(base_model)}))
    log.info("cached the latents of %d samples in %s", len(ids), store.root)
    return store.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="FFHQ-wild folder (cache before packing shards)")
    parser.add_argument("--base-model", required=True, help="the Stable Diffusion folder, hub id or file whose VAE trains")
    parser.add_argument("--resolution", type=int, required=True, help="training resolution in pixels (data.resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cache_latents(args.root, base_model=args.base_model, resolution=args.resolution, batch_size=args.batch_size,
                  device=args.device)


if __name__ == "__main__":
    main()
