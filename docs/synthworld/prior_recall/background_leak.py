"""Does the reference render's studio background change what MoA draws?

usage: python docs/synthworld/prior_recall/background_leak.py PRIOR WORLD MOA_WEIGHTS OUT_JSON [PER_WORD]

The main protocol's held-out subjects (PER_WORD per word), contexts and sampler (``conf/synthworld.yaml``'s
``eval``, seed 0 only), each subject's reference re-rendered in one pose on every studio colour
(``render_reference(background=...)``, saved as the world saves it: JPEG quality 95). The encoder never sees the
background itself (the crop masks it to the encoder's mean colour), only the figure's edge pixels blended with it.
For each background: the judges' reading of the re-rendered references (control) and of MoA's images, per
identity attribute; and per attribute, the share of (subject, context) pairs whose MoA image is read as the same
class on every background (1.0: the background changes nothing the judges see). Hair colour counts only where
there is hair (``observable``).
"""

import dataclasses
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from moa.config import CONFIG_DIR, asset
from moa.data.transforms import image_to_tensor
from moa.inference.pipeline import MoAPipeline, scheduler_from_name
from moa.models.model import MoAModel
from moa.synthworld.judges import ATTRIBUTES, IDENTITY_ATTRIBUTES, Judges
from moa.synthworld.measure import generate_subjects, pick_contexts, pick_subjects
from moa.synthworld.world import STUDIO_BACKGROUNDS, Identity, observable, render_reference

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("background_leak")


def visible(subjects) -> torch.Tensor:
    """(n, identity attributes) True where the attribute can be seen on the subject."""
    return torch.tensor([[observable(name, s.identity) for name in IDENTITY_ATTRIBUTES] for s in subjects])


def accuracy(read: torch.Tensor, truth: torch.Tensor, seen: torch.Tensor) -> dict[str, float]:
    """Per identity attribute, the share of visible cases read as the truth."""
    hits = ((read == truth) & seen).sum(0) / seen.sum(0).clamp(min=1)
    return dict(zip(IDENTITY_ATTRIBUTES, hits.tolist()))


def main(prior: str, world: str, moa_weights: str, out: str, per_word: str | None = None) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="synthworld")
    subjects = pick_subjects(Path(world), int(per_word or cfg.eval.subjects_per_word))
    contexts = pick_contexts(cfg.eval.contexts, cfg.seed)
    size = Image.open(next(iter(subjects.values()))[0].reference).size[0]
    judges = Judges.load(asset("synth-judges"))
    columns = [list(ATTRIBUTES).index(name) for name in IDENTITY_ATTRIBUTES]
    model = MoAModel.from_pretrained(prior, asset("synth-clip"), moa_weights=moa_weights)
    pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(cfg.eval.scheduler, model.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    reads, results = {}, {"per_background": {}}
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        for b, background in enumerate(STUDIO_BACKGROUNDS):
            shown = {}
            for word, people in subjects.items():
                shown[word] = []
                for s in people:
                    rng = random.Random(f"{s.image_id}-pose")  # one pose per subject, on every background
                    image, seg = render_reference(rng, Identity(**s.identity), size=size, background=background)
                    path = Path(scratch) / f"{s.image_id}_{b}"
                    image.save(path.with_suffix(".jpg"), quality=95)
                    np.save(path.with_suffix(".npy"), seg)
                    shown[word].append(dataclasses.replace(s, reference=path.with_suffix(".jpg"),
                                                           reference_mask=path.with_suffix(".npy")))
            flat = [s for people in shown.values() for s in people]
            renders = torch.stack([image_to_tensor(Image.open(s.reference).convert("RGB")) for s in flat])
            masks = torch.stack([torch.from_numpy(np.load(s.reference_mask) > 0).float()[None] for s in flat])
            truth = torch.tensor([[s.attributes[c] for c in columns] for s in flat])
            reference_read = judges.read_subject(renders, masks)[:, columns]
            images, _ = generate_subjects(pipe, shown, contexts, [0], cfg)
            keys = sorted(images)
            people = [shown[k[0]][k[1]] for k in keys]
            read = judges.read_subject(torch.stack([images[k] for k in keys]))[:, columns]
            truth_of_images, seen = torch.tensor([[s.attributes[c] for c in columns] for s in people]), visible(people)
            reads[b] = dict(zip(keys, read))
            results["per_background"][str(background)] = {
                "reference": accuracy(reference_read, truth, visible(flat)),
                "moa": accuracy(read, truth_of_images, seen),
                "moa_identity": (((read == truth_of_images) & seen).sum() / seen.sum()).item(), "images": len(keys)}
            log.info("background %s: %s", background, json.dumps(results["per_background"][str(background)]))
    keys = list(reads[0])
    same = torch.stack([torch.stack([reads[b][k] for b in reads]).eq(reads[0][k]).all(0) for k in keys])
    seen = visible([subjects[k[0]][k[1]] for k in keys])
    results["same_read_on_every_background"] = dict(zip(IDENTITY_ATTRIBUTES,
                                                         ((same & seen).sum(0) / seen.sum(0)).tolist()))
    results["pairs"] = len(keys)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
    log.info("same reading on every background: %s", json.dumps(results["same_read_on_every_background"]))


if __name__ == "__main__":
    main(*sys.argv[1:6])
