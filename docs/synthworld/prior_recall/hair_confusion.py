"""Which hair colour does MoA draw for which subject? The confusion behind a below-chance attribute.

usage: python docs/synthworld/prior_recall/hair_confusion.py PRIOR WORLD MOA_WEIGHTS OUT_JSON [PER_WORD]

The main protocol's held-out subjects, contexts, seeds and sampler (``conf/synthworld.yaml``'s ``eval``, with
PER_WORD subjects per word instead of its 4), read by the committed judges: for each true hair colour, how often the judges
read each colour on (a) the subject's reference render (what the image encoder sees), (b) the prior's image of
a caption that names the attributes, (c) MoA's image of the plain caption with the reference render as
subject. Bald subjects show no hair colour and are left out.
"""

import json
import logging
import sys
from pathlib import Path
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from moa.config import CONFIG_DIR, asset
from moa.data.transforms import image_to_tensor
from moa.inference.pipeline import MoAPipeline, scheduler_from_name
from moa.models.model import MoAModel
from moa.synthworld.judges import ATTRIBUTES, Judges
from moa.synthworld.measure import generate_described, generate_subjects, pick_contexts, pick_subjects
from moa.synthworld.world import HAIR_COLOUR

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("hair_confusion")


def confusion(read: torch.Tensor, truth: torch.Tensor, names: tuple) -> dict:
    """{true colour: {read colour: count}} from (n,) class indices."""
    table = {name: {other: 0 for other in names} for name in names}
    for r, t in zip(read.tolist(), truth.tolist()):
        table[names[t]][names[r]] += 1
    return table


def main(prior: str, world: str, moa_weights: str, out: str, per_word: str | None = None) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="synthworld")
    subjects = pick_subjects(Path(world), int(per_word or cfg.eval.subjects_per_word))
    contexts = pick_contexts(cfg.eval.contexts, cfg.seed)
    seeds = list(range(cfg.eval.seeds))
    judges = Judges.load(asset("synth-judges"))
    hair = list(ATTRIBUTES).index("hair_colour")
    names = tuple(HAIR_COLOUR)
    model = MoAModel.from_pretrained(prior, asset("synth-clip"), moa_weights=moa_weights)
    pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(cfg.eval.scheduler, model.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    results = {}
    with torch.no_grad():
        references = {(w, i): s for w, people in subjects.items() for i, s in enumerate(people)}
        visible = {k for k, s in references.items() if s.identity["hair_style"] != "bald"}
        truth_of = {k: names.index(references[k].identity["hair_colour"]) for k in visible}
        order = sorted(visible)
        renders = torch.stack([image_to_tensor(Image.open(references[k].reference).convert("RGB")) for k in order])
        masks = torch.stack([torch.from_numpy(np.load(references[k].reference_mask) > 0).float()[None] for k in order])
        read = judges.read_subject(renders, masks)[:, hair]
        results["reference_render"] = confusion(read, torch.tensor([truth_of[k] for k in order]), names)
        for label, images in (("prior_described", generate_described(pipe, subjects, contexts, seeds, cfg)),
                              ("moa", generate_subjects(pipe, subjects, contexts, seeds, cfg)[0])):
            keys = [k for k in images if (k[0], k[1]) in visible]
            read = judges.read_subject(torch.stack([images[k] for k in keys]))[:, hair]
            results[label] = confusion(read, torch.tensor([truth_of[(k[0], k[1])] for k in keys]), names)
    Path(out).write_text(json.dumps(results, indent=1))
    for label, table in results.items():
        log.info("%s (rows: true colour, columns: read as %s):\n%s", label, names,
                 "\n".join(f"{t:>6}: {list(row.values())}" for t, row in table.items()))


if __name__ == "__main__":
    main(*sys.argv[1:6])
