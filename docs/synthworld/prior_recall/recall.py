"""Does a prior redraw the people of scenes it trained on when given their own (described) captions?
And does MoA, given each trained-on person's reference render and the plain caption?

usage: python docs/synthworld/prior_recall/recall.py PRIOR WORLD OUT_JSON [--moa-weights DIR] [--scenes 48]
           [--scheduler UniPCMultistepScheduler] [--steps 25] [--guidance 5]

For the first ``--scenes`` single-person scenes of WORLD's train split (captions the prior trained on)
and of its test split (captions it never saw), 2 seeds each, read by the committed judges (identity through
the segmenter's mask, context of the whole image):
- ``generated``: the prior's own images of each scene's exact caption (in a described world, it names the
  person's attributes);
- with ``--moa-weights``, ``moa``: MoA's images of the scene's plain caption ("a man holding ...") with that
  person's reference render as the subject, as stage 2 trained on them; ``prior_plain``: the same prompts
  and seeds without the subject (the prior alone);
beside the renders themselves and the VAE's reconstructions (the ceiling), and a shuffled control (each
generated image judged against another scene's person of the same word: what the marginals alone score).
"""

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL
from torchvision.utils import save_image

from moa.data.ffhq import read_raw_sample
from moa.data.stores import FolderStore
from moa.data.transforms import image_to_tensor
from moa.inference.pipeline import MoAPipeline, Subject, scheduler_from_name
from moa.models.model import MoAModel
from moa.synthworld.judges import ATTRIBUTES, CONTEXT, IDENTITY_ATTRIBUTES, Judges
from moa.synthworld.measure import identity_hits
from moa.synthworld.world import WORDS, compose_caption

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("recall")
WORD_COLUMN = list(ATTRIBUTES).index("word")
SEEDS = (0, 1)


def scenes(world: Path, split: str, count: int) -> list[dict]:
    """The first ``count`` single-person scenes of a split: render, captions, reference, truth."""
    store, found = FolderStore(world), []
    for image_id in store.split(split):
        annotation = json.loads(store.read(image_id, "json"))
        if len(annotation["identities"]) == 1:
            identity, context = annotation["identities"][0], annotation["context"]
            reference = next(s["reference"] for s in annotation["segments"] if s.get("reference"))
            found.append({"id": image_id, "caption": annotation["caption"], "word": identity["word"],
                          "plain_caption": compose_caption([identity["word"]], context)[0],
                          "reference": world / image_id[:5] / f"{reference}.jpg",
                          "reference_mask": np.load(world / image_id[:5] / f"{reference}.npy") > 0,
                          "image": image_to_tensor(read_raw_sample(store, image_id).image),
                          "identity": [ATTRIBUTES[n].index(identity[n]) for n in ATTRIBUTES],
                          "context": [list(CONTEXT[f]).index(context[f]) for f in CONTEXT]})
        if len(found) == count:
            break
    return found


def identity_rate(judges: Judges, images: torch.Tensor, truth: torch.Tensor) -> dict:
    """Identity attributes read correctly: mean, its standard error over images, and per attribute."""
    hits = identity_hits(judges, dict(enumerate(images)), lambda k: SimpleNamespace(attributes=truth[k].tolist()))
    return {"mean": hits.mean().item(), "stderr": (hits.mean(1).std() / len(hits) ** 0.5).item(),
            **dict(zip(IDENTITY_ATTRIBUTES, hits.mean(0).tolist()))}


def shuffled_truth(rows: list[dict]) -> torch.Tensor:
    """Each scene's identity replaced by the next scene's of the same word (a control)."""
    by_word = {w: [r for r in rows if r["word"] == w] for w in WORDS}
    return torch.tensor([by_word[r["word"]][(by_word[r["word"]].index(r) + 1) % len(by_word[r["word"]])]["identity"]
                         for r in rows])


def generate(pipe, rows: list[dict], prompt_key: str, with_subjects: bool, sampler: dict) -> torch.Tensor:
    """Every row's image for each of ``SEEDS``: (len(SEEDS) * len(rows), 3, H, W), seed-major."""
    images = []
    for seed in SEEDS:
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            subjects = ([[Subject(r["reference"], r["word"], mask=r["reference_mask"])] for r in chunk]
                        if with_subjects else None)
            images.append(pipe([r[prompt_key] for r in chunk], subjects,
                               generator=[torch.Generator().manual_seed(seed) for _ in chunk],
                               output_type="pt", **sampler).images.float().cpu())
    return torch.cat(images)


def main(args: argparse.Namespace) -> None:
    judges = Judges.load("moa/assets/synth-judges")
    model = MoAModel.from_pretrained(args.prior, "moa/assets/synth-clip", moa_weights=args.moa_weights)
    pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(args.scheduler, model.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    sampler = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    vae = AutoencoderKL.from_pretrained(args.prior, subfolder="vae").eval()
    results = {"sampler": {"scheduler": args.scheduler, **sampler}, "moa_weights": str(args.moa_weights)}
    for split in ("train", "test"):
        rows = scenes(args.world, split, args.scenes)
        renders = torch.stack([r["image"] for r in rows])
        truth = torch.tensor([r["identity"] for r in rows]).repeat(len(SEEDS), 1)
        context_truth = torch.tensor([r["context"] for r in rows]).repeat(len(SEEDS), 1)
        with torch.no_grad():
            recon = (vae.decode(vae.encode(renders * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        images = {"generated": generate(pipe, rows, "caption", False, sampler)}
        if args.moa_weights:
            images["moa"] = generate(pipe, rows, "plain_caption", True, sampler)
            images["prior_plain"] = generate(pipe, rows, "plain_caption", False, sampler)
        result = {"scenes": len(rows), "renders": identity_rate(judges, renders, truth[:len(rows)]),
                  "vae_reconstructions": identity_rate(judges, recon, truth[:len(rows)])}
        for name, batch in images.items():
            result[name] = identity_rate(judges, batch, truth)
            result[f"{name}_vs_shuffled_people"] = identity_rate(judges, batch, shuffled_truth(rows).repeat(len(SEEDS), 1))
            result[f"{name}_context"] = dict(zip(CONTEXT, (judges.read_context(batch) == context_truth).float().mean(0).tolist()))
            result[f"{name}_word"] = (judges.read_subject(batch)[:, WORD_COLUMN] == truth[:, WORD_COLUMN]).float().mean().item()
            # pixel distance to the scene's own render vs to another scene's (memorised pixels?)
            result[f"{name}_mse_to_own_render"] = (batch - renders.repeat(len(SEEDS), 1, 1, 1)).pow(2).mean().item()
            result[f"{name}_mse_to_other_render"] = (batch - renders.roll(1, 0).repeat(len(SEEDS), 1, 1, 1)).pow(2).mean().item()
        results[split] = result
        log.info("%s: %s", split, json.dumps(result))
        # rows: renders, VAE reconstructions, then each kind of generation (seed 0)
        save_image(torch.cat([renders[:8], recon[:8], *(batch[:8] for batch in images.values())]),
                   args.out.with_name(f"{args.out.stem}_{split}.png"), nrow=8)
    results["caption_example"] = rows[0]["caption"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior")
    parser.add_argument("world", type=Path, help="a world whose captions name the people (described_fraction=1)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--moa-weights", type=Path, default=None)
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--scheduler", default="UniPCMultistepScheduler")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    main(parser.parse_args())
