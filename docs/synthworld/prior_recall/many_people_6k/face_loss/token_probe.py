"""Where does a trained MoA lose an identity attribute? Probe it in the image embedding and in the subject token.

usage: python docs/synthworld/prior_recall/many_people_6k/face_loss/token_probe.py PRIOR WORLD MOA_WEIGHTS OUT_JSON

For every person of the world's train and test splits (their reference renders, as stage 2 sees them):
(a) the image encoder's embedding, (b) the multimodal prompt encoder's subject token (all blocks
concatenated) at timesteps 100, 500 and 900, the word's embedding taken from "a man" / "a woman" (the
causal text encoder gives the word the same output at the start of every world caption). Per attribute:
the held-out accuracy of a linear probe (``moa.synthworld.measure.probe_attributes``, train -> test
people) and the attribute's share of the features' variance across test people (between-class sum
of squares over total).
"""

import json
import logging
import sys
from pathlib import Path

import torch

from moa.config import asset
from moa.models.model import MoAModel
from moa.synthworld.judges import ATTRIBUTES
from moa.synthworld.measure import probe_attributes
from moa.synthworld.world import observable, subject_crops

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("token_probe")
TIMESTEPS = (100, 500, 900)


def features(model: MoAModel, world: Path, split: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """{feature name: (people, dim)} and the people's identities."""
    pixels, identities = subject_crops(world, split, model.subject_image_spec, sources=("reference",))
    with torch.no_grad():
        embeddings = torch.cat([model.encode_subjects(chunk[:, None]) for chunk in pixels.split(256)])[:, 0]
        word_embedding = {word: model.encode_text(model.tokenizer([f"a {word}"], return_tensors="pt").input_ids)[0, 2]
                          for word in ("man", "woman")}
        words = torch.stack([word_embedding[i["word"]] for i in identities])[:, None]
        found = {"image_embedding": embeddings}
        for t in TIMESTEPS:
            tokens = model.prompt_encoder(embeddings[:, None], words, torch.full((len(embeddings),), t))
            found[f"subject_token_t{t}"] = tokens[:, :, 0, 0].flatten(1)  # (people, blocks * dim)
    return found, identities


def variance_share(test: torch.Tensor, identities: list[dict], name: str, classes: tuple) -> float:
    """Share of the variance across the people where ``name`` is visible explained by its class means."""
    seen = torch.tensor([observable(name, i) for i in identities])
    labels = torch.tensor([classes.index(i[name]) for i in identities])[seen]
    centred = test[seen] - test[seen].mean(0)
    between = sum((labels == c).sum() * centred[labels == c].mean(0).pow(2).sum()
                  for c in range(len(classes)) if (labels == c).any())
    return (between / len(labels) / centred.pow(2).sum(1).mean()).item()


def main(prior: str, world: str, moa_weights: str, out: str) -> None:
    model = MoAModel.from_pretrained(prior, asset("synth-clip"), moa_weights=moa_weights).eval()
    (train, train_ids), (test, test_ids) = features(model, Path(world), "train"), features(model, Path(world), "test")
    results = {}
    for key in train:
        accuracy = probe_attributes(train[key], train_ids, test[key], test_ids)
        results[key] = {name: {"probe_accuracy": accuracy[name],
                               "variance_share": variance_share(test[key], test_ids, name, classes)}
                        for name, classes in ATTRIBUTES.items()}
        log.info("%s: %s", key, {n: (round(v["probe_accuracy"], 3), round(v["variance_share"], 3))
                                 for n, v in results[key].items()})
    results["people"] = {"train": len(train_ids), "test": len(test_ids)}
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
