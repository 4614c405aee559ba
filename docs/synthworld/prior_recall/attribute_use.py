"""Which identity attributes of the subject image does trained MoA actually use, and where on the figure?

usage: python docs/synthworld/prior_recall/attribute_use.py PRIOR WORLD OUT_DIR NAME=MOA_WEIGHTS [NAME=MOA_WEIGHTS ...]

Judge-free and counterfactual. For every held-out ("test") scene of WORLD, each person's reference render is drawn
again in exactly its pose (the world's own reference generator: the pose draws do not depend on the identity) with
one identity attribute changed to the next value of its list (black hair -> blond, pale skin -> tan, ...); one copy
of the test split per attribute is written under OUT_DIR/worlds/. The trained model then denoises the same scenes
(same latents, noise and timesteps as the main report's judge-free gain) given the true reference and given each
changed one. ``use`` of an attribute = how much the denoising error on the subject's head pixels (face and hair)
and on the rest of the figure rises when only that attribute of the reference is wrong, as a share of the error
with the true reference, with the paired standard error; ``by_timestep_quarter``: the same for each quarter of
the training timesteps, low noise first (an attribute used only at low noise is one the noisy image already shows:
sampling, which sets colours at high noise, would not get it from the reference). A pair whose changed reference encodes exactly as the true
one (the hair colour of a bald person) is left out. For scale, the same numbers for another subject's reference.

If the hair colour's use on the head is near 0 while the shirt colour's on the body is large, the trained objective
itself ignores the hair colour the image embedding carries: a learning problem, not a sampling one.
"""

import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moa.config import asset
from moa.data.datamodule import FFHQWildDataModule
from moa.models.model import MoAModel
from moa.seeding import derived_seed
from moa.synthworld.measure import IMAGE_SIZE, subject_denoising_errors
from moa.synthworld.world import (HAIR_COLOUR, HAIR_STYLE, PERSON_SEGMENTS, SHIRT_COLOUR, SHIRT_PATTERN, SKIN,
                                  WORLD_FILE, Identity, ReferenceRenders, render_reference, sample_dir)

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("attribute_use")
VALUES = {"skin": tuple(SKIN), "hair_colour": tuple(HAIR_COLOUR), "hair_style": HAIR_STYLE,
          "shirt_colour": tuple(SHIRT_COLOUR), "shirt_pattern": SHIRT_PATTERN}


def changed(identity: dict, attribute: str) -> Identity:
    values = VALUES[attribute]
    return Identity(**{**identity, attribute: values[(values.index(identity[attribute]) + 1) % len(values)]})


def counterfactual_world(world: Path, out: Path, attribute: str) -> Path:
    """A copy of ``world``'s test split whose references show each person with ``attribute`` changed."""
    if (out / "image_ids.txt").exists():
        return out
    settings = json.loads((world / WORLD_FILE).read_text())
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    test_ids = (world / "image_ids_test.txt").read_text().split()
    for image_id in test_ids:
        source, folder = sample_dir(world, image_id), sample_dir(staging, image_id)
        folder.mkdir(exist_ok=True)
        for suffix in (".jpg", ".npy", ".json"):
            shutil.copy(source / f"{image_id}{suffix}", folder / f"{image_id}{suffix}")
        annotation = json.loads((source / f"{image_id}.json").read_text())
        # write_synthetic_ffhq's reference stream for this sample, drawn in the same segment order
        reference_rng = random.Random(derived_seed(settings["seed"], int(image_id)))
        for segment in annotation["segments"]:
            if segment["coco_label"] == "person":
                identity = annotation["identities"][segment["id"] - PERSON_SEGMENTS.start]
                reference, segmap = render_reference(reference_rng, changed(identity, attribute), size=settings["size"],
                                                     head_scale=settings["head_scale"])
                reference.save(folder / f"{segment['reference']}.jpg", quality=95)
                np.save(folder / f"{segment['reference']}.npy", segmap)
    # The data module sets up its train split too; only the test split is read.
    for name in ("image_ids.txt", "image_ids_test.txt", "image_ids_train.txt"):
        (staging / name).write_text("\n".join(test_ids) + "\n")
    shutil.copy(world / WORLD_FILE, staging / WORLD_FILE)
    staging.rename(out)
    return out


def loader(world: Path, prior: str, seed: int, samples: int):
    # identity_information_gain's held-out batches: same split, sample choice, order and batch size
    return FFHQWildDataModule(root=str(world), base_model=prior, image_encoder=asset("synth-clip"),
                              resolution=IMAGE_SIZE, batch_size=16, num_workers=0, seed=seed,
                              subject_source=ReferenceRenders(), val_split="test", val_samples=samples,
                              face_regions=True).val_dataloader()


def use(errors: dict, condition: str, keep: torch.Tensor) -> dict:
    """Relative rise of the error under ``condition`` over the true reference's, paired, on ``keep`` pairs."""
    true, other = errors["true"][keep], errors[condition][keep]
    difference = other - true
    return {"use": (difference.mean() / true.mean()).item(),
            "stderr": (difference.std() / len(difference) ** 0.5 / true.mean()).item(), "pairs": int(keep.sum())}


@torch.no_grad()
def measure(model: MoAModel, worlds: dict[str, Path], prior: str, seed: int = 0, samples: int = 256,
            draws: int = 2) -> dict:
    errors = {region: {name: [] for name in ["true", "another", *VALUES]} for region in ("head", "body")}
    differs, drawn_timesteps = {name: [] for name in VALUES}, []
    for index, batches in enumerate(zip(*(loader(w, prior, seed, samples) for w in worlds.values()))):
        batches = dict(zip(worlds, batches))
        true = batches["true"]
        for name, batch in batches.items():
            if not torch.equal(batch["index"], true["index"]) or not torch.equal(batch["pixel_values"], true["pixel_values"]):
                raise RuntimeError(f"batch {index}: the {name} world's scenes differ from the true world's")
        features = {name: model.encode_subjects(batch["subject_pixel_values"]) for name, batch in batches.items()}
        valid = true["subject_valid"]
        conditions = {"true": (features["true"], valid),
                      "another": (features["true"][torch.roll(torch.arange(len(valid)), 1)], valid),
                      **{name: (features[name], valid) for name in VALUES}}
        batch_errors, timesteps = subject_denoising_errors(model, true, conditions,
                                                           torch.Generator().manual_seed(seed * 100_003 + index), draws)
        drawn_timesteps.append(timesteps)
        for region in errors:
            for name in errors[region]:
                errors[region][name].append(batch_errors[region][name])
        for name in VALUES:  # per sample, repeated per draw as the errors are
            same = (features[name] - features["true"]).flatten(1).abs().amax(1) == 0
            differs[name].append((~same).repeat(draws))
    errors = {region: {name: torch.cat(v) for name, v in by_name.items()} for region, by_name in errors.items()}
    differs = {name: torch.cat(v) for name, v in differs.items()}
    everything = torch.ones_like(differs["skin"])
    quarter_of = torch.cat(drawn_timesteps) * 4 // model.noise_scheduler.config.num_train_timesteps  # 0 = lowest noise
    return {region: {name: {**use(errors[region], name, differs.get(name, everything)),
                            "by_timestep_quarter": [use(errors[region], name, differs.get(name, everything) & (quarter_of == q))
                                                    for q in range(4)]}
                     for name in ["another", *VALUES]}
            for region in errors}


def main(prior: str, world: str, out: str, *variants: str) -> None:
    if not variants:
        raise SystemExit(__doc__)
    world, out = Path(world), Path(out)
    worlds = {"true": world, **{name: counterfactual_world(world, out / "worlds" / name, name) for name in VALUES}}
    results = {"changed_to": {name: "the next value of " + str(list(values)) for name, values in VALUES.items()}}
    for variant in variants:
        name, weights = variant.split("=", 1)
        start = time.time()
        model = MoAModel.from_pretrained(prior, asset("synth-clip"), moa_weights=weights)
        results[name] = measure(model, worlds, prior)
        results[name]["seconds"] = round(time.time() - start, 1)
        for region in ("head", "body"):
            log.info("%s %s: %s", name, region, ", ".join(
                f"{a} {100 * r['use']:.1f}+-{100 * r['stderr']:.1f}%" for a, r in results[name][region].items()))
    (out / "attribute_use.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
