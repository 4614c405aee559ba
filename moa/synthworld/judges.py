"""SynthWorld's judges: small networks trained on renders whose truth is known, standing in for the
paper's FaceNet (identity), CLIP (prompt/context) and a subject segmenter.

- ``SubjectSegmenter``: per-pixel "is a person" for a 64x64 scene (finds subjects in generations).
- ``ContextClassifier``: a scene's place, object, object colour and whether the object is held.
- ``AttributeClassifier``: a subject's identity attributes from a square crop around it.

``JudgeLitModule`` trains all three at once on ``WorldLabels`` (tensors read once from a SynthWorld
folder). ``Judges`` is the trained bundle used to score generated images. Renders are augmented with
blur and noise so the judges are not thrown by a tiny VAE's softer images; their accuracy on the
held-out renders and on the prior VAE's reconstructions of them is reported with every evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from moa.data.ffhq import read_raw_sample
from moa.data.stores import FolderStore
from moa.data.transforms import image_to_tensor, mask_bbox
from moa.files import atomic_path, write_text
from moa.seeding import derived_seed
from moa.synthworld.world import (
    BACKGROUNDS,
    HAIR_COLOUR,
    HAIR_STYLE,
    OBJECT_COLOUR,
    OBJECTS,
    PERSON_SEGMENTS,
    SHIRT_COLOUR,
    SHIRT_PATTERN,
    SKIN,
    WORDS,
    read_reference,
)

log = logging.getLogger(__name__)

# Factor -> its classes, in the order the heads predict them. "word" is in the prompt, so identity
# accuracy is reported over the other five.
ATTRIBUTES = {"word": WORDS, "skin": tuple(SKIN), "hair_colour": tuple(HAIR_COLOUR), "hair_style": HAIR_STYLE,
              "shirt_colour": tuple(SHIRT_COLOUR), "shirt_pattern": SHIRT_PATTERN}
IDENTITY_ATTRIBUTES = ("skin", "hair_colour", "hair_style", "shirt_colour", "shirt_pattern")
CONTEXT = {"place": tuple(BACKGROUNDS), "object": tuple(OBJECTS), "object_colour": tuple(OBJECT_COLOUR),
           "holding": (False, True)}
CROP_SIZE = 32
JUDGES_FILE, JUDGES_CONFIG = "judges.safetensors", "judges.json"


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class _Classifier(nn.Module):
    """A small CNN with one linear head per factor: (n, 3, H, W) in [0, 1] -> {factor: (n, classes)}."""

    def __init__(self, factors: dict[str, tuple], width: int = 32):
        super().__init__()
        self.factors = factors
        self.features = nn.Sequential(_conv(3, width, 2), _conv(width, width * 2), _conv(width * 2, width * 4, 2),
                                      _conv(width * 4, width * 4))
        # Max- next to average-pooling: a small object (a ball is ~9 pixels wide) must not be averaged away.
        self.heads = nn.ModuleDict({name: nn.Linear(width * 8, len(classes)) for name, classes in factors.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2 - 1)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


class AttributeClassifier(_Classifier):
    """Identity attributes of a subject crop (n, 3, 32, 32), the FaceNet analogue."""

    def __init__(self):
        super().__init__(ATTRIBUTES)


class ContextClassifier(_Classifier):
    """Place, object, object colour and holding of a whole scene (n, 3, 64, 64), the CLIP analogue."""

    def __init__(self):
        super().__init__(CONTEXT)


class SubjectSegmenter(nn.Module):
    """Person-vs-rest logits per pixel: (n, 3, H, W) in [0, 1] -> (n, 1, H, W). A small U-Net that
    works at half resolution (people are large; full-resolution convolutions cost 3x the time)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.down1, self.down2 = _conv(3, width, 2), nn.Sequential(_conv(width, width * 2, 2), _conv(width * 2, width * 2))
        self.bottom = nn.Sequential(_conv(width * 2, width * 4, 2), _conv(width * 4, width * 4))
        self.up2 = _conv(width * 4 + width * 2, width * 2)
        self.up1 = _conv(width * 2 + width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x1 = self.down1(images * 2 - 1)
        x2 = self.down2(x1)
        x3 = self.bottom(x2)
        x = self.up2(torch.cat([F.interpolate(x3, size=x2.shape[-2:]), x2], 1))
        x = self.up1(torch.cat([F.interpolate(x, size=x1.shape[-2:]), x1], 1))
        return F.interpolate(self.out(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def square_crop(image: torch.Tensor, mask: torch.Tensor, *, size: int = CROP_SIZE, margin: float = 0.1) -> torch.Tensor:
    """The square around ``mask``'s bounding box (grown by ``margin``), resized: image (3, H, W),
    mask (H, W) -> (3, size, size). An empty mask gives the whole image."""
    height, width = mask.shape
    x1, y1, x2, y2 = mask_bbox(mask > 0) or [0, 0, width, height]
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    side = max(1, int(round(side)))
    padded = F.pad(image, (side, side, side, side), mode="replicate")
    crop = padded[:, top + side: top + 2 * side, left + side: left + 2 * side]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _labels(annotation_values: dict, factors: dict[str, tuple]) -> list[int]:
    return [factors[name].index(annotation_values[name]) for name in factors]


class WorldLabels:
    """One SynthWorld split as tensors, with the truth the judges learn from.

    scenes (n, 3, H, W) in [0, 1]; person_masks (n, 1, H, W) {0, 1}; context (n, 4) class indices
    (order of ``CONTEXT``); crops (m, 3, 32, 32) of every person, from the scene and from their
    reference render; attributes (m, 6) class indices (order of ``ATTRIBUTES``); scene_people: for
    each crop cut from a scene, (crop index, scene index, that person's mask (H, W)).
    """

    def __init__(self, root: str | os.PathLike, split: str):
        store = FolderStore(root)
        scenes, masks, context, crops, attributes, self.scene_people = [], [], [], [], [], []
        for image_id in store.split(split):
            raw = read_raw_sample(store, image_id)
            annotation = json.loads(store.read(image_id, "json"))
            image = image_to_tensor(raw.image)
            segments = torch.from_numpy(raw.segments.astype(np.int64))
            scenes.append(image)
            masks.append(((segments >= PERSON_SEGMENTS.start) & (segments < PERSON_SEGMENTS.stop)).float()[None])
            context.append(_labels(annotation["context"], CONTEXT))
            for segment in raw.subjects:
                identity = annotation["identities"][segment["id"] - PERSON_SEGMENTS.start]
                person = (segments == segment["id"]).float()
                self.scene_people.append((len(crops), len(scenes) - 1, person))
                crops.append(square_crop(image, person))
                attributes.append(_labels(identity, ATTRIBUTES))
                if segment.get("reference"):
                    crops.append(square_crop(*read_reference(store, segment["reference"])))
                    attributes.append(_labels(identity, ATTRIBUTES))
        self.scenes, self.person_masks = torch.stack(scenes), torch.stack(masks)
        self.context = torch.tensor(context)
        self.crops, self.attributes = torch.stack(crops), torch.tensor(attributes)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation: random blur (a 3x3 box mixed in), pixel noise and a brightness shift,
    so the judges also read the softer images a tiny VAE decodes. images (n, 3, H, W) in [0, 1]."""
    n = images.shape[0]
    strength = torch.rand(n, 1, 1, 1, generator=generator)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = images + strength * (blurred - images)
    images = images + 0.04 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    images = images + 0.06 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return images.clamp(0, 1)


def factor_accuracy(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Accuracy per factor: logits {factor: (n, classes)} in the order of labels' columns (n, factors)."""
    return {name: (value.argmax(-1) == labels[:, i]).float().mean().item() for i, (name, value) in enumerate(logits.items())}


def mask_iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Intersection over union of ``logits > 0`` with ``masks``, pooled over the batch."""
    predicted, truth = logits > 0, masks > 0.5
    return ((predicted & truth).sum() / (predicted | truth).sum().clamp(min=1)).item()


class JudgeLitModule(pl.LightningModule):
    """Trains segmenter, context and attribute classifiers together; each batch draws scenes and
    crops at random (seeded by the step, so a resumed run sees the same batches)."""

    def __init__(self, train: WorldLabels, *, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
        super().__init__()
        self.data, self.batch_size, self.lr, self.seed = train, batch_size, lr, seed
        self.judges = Judges()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        # The data already sit in memory as tensors; the loader only counts steps.
        return torch.utils.data.DataLoader(range(10**9), batch_size=1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.global_step))
        scenes = torch.randint(len(self.data.scenes), (self.batch_size,), generator=generator)
        crops = torch.randint(len(self.data.crops), (self.batch_size,), generator=generator)
        scene_images = degrade(self.data.scenes[scenes], generator)
        crop_images = degrade(self.data.crops[crops], generator)
        judges = self.judges
        segmentation = F.binary_cross_entropy_with_logits(judges.segmenter(scene_images), self.data.person_masks[scenes])
        context_logits, attribute_logits = judges.context(scene_images), judges.attributes(crop_images)
        context = sum(F.cross_entropy(v, self.data.context[scenes, i]) for i, v in enumerate(context_logits.values()))
        attributes = sum(F.cross_entropy(v, self.data.attributes[crops, i]) for i, v in enumerate(attribute_logits.values()))
        loss = segmentation + context / len(CONTEXT) + attributes / len(ATTRIBUTES)
        self.log_dict({"judges/segmentation": segmentation, "judges/context": context, "judges/attributes": attributes},
                      prog_bar=True)
        return loss


class Judges(nn.Module):
    """The trained judges; ``Judges.load(folder)`` / ``save(folder)`` (safetensors + JSON of the classes)."""

    def __init__(self):
        super().__init__()
        self.segmenter, self.context, self.attributes = SubjectSegmenter(), ContextClassifier(), AttributeClassifier()

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / JUDGES_FILE) as staging:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(staging))
        write_text(folder / JUDGES_CONFIG, json.dumps({"attributes": ATTRIBUTES, "context": CONTEXT}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Judges:
        folder = Path(folder)
        config = json.loads((folder / JUDGES_CONFIG).read_text())
        expected = json.loads(json.dumps({"attributes": ATTRIBUTES, "context": CONTEXT}))
        if config != expected:
            raise ValueError(f"{folder / JUDGES_CONFIG}: the judges were trained on another world's classes")
        judges = cls()
        judges.load_state_dict(load_file(str(folder / JUDGES_FILE)))
        return judges.eval()

    @torch.no_grad()
    def person_masks(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1] -> (n, 1, H, W) {0, 1}."""
        return (self.segmenter(images) > 0).float()

    @torch.no_grad()
    def read_context(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> (n, 4) predicted class indices (order of ``CONTEXT``)."""
        return torch.stack([v.argmax(-1) for v in self.context(images).values()], dim=1)

    @torch.no_grad()
    def read_subject(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Attributes of the person in each image: (n, 3, H, W) -> (n, 6) class indices (order of
        ``ATTRIBUTES``), read from the square around the segmenter's mask (or ``masks`` (n, 1, H, W))."""
        masks = self.person_masks(images) if masks is None else masks
        crops = torch.stack([square_crop(image, mask[0]) for image, mask in zip(images, masks)])
        return torch.stack([v.argmax(-1) for v in self.attributes(crops).values()], dim=1)

    @torch.no_grad()
    def accuracy_on(self, data: WorldLabels) -> dict[str, float]:
        """Held-out accuracy per factor, and the segmenter's IoU, on rendered truth."""
        results = {f"context/{k}": v for k, v in factor_accuracy(self.context(data.scenes), data.context).items()}
        results |= {f"attribute/{k}": v for k, v in factor_accuracy(self.attributes(data.crops), data.attributes).items()}
        results["segmenter_iou"] = mask_iou(self.segmenter(data.scenes), data.person_masks)
        return results


def train_judges(root: str | os.PathLike, out_dir: str | os.PathLike, *, max_steps: int, seed: int = 0) -> Judges:
    """Train the judges on ``root``'s train split with Lightning (CPU), save them to ``out_dir``."""
    pl.seed_everything(seed, workers=True)
    module = JudgeLitModule(WorldLabels(root, "train"), seed=seed)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=str(out_dir), enable_model_summary=False, log_every_n_steps=25)
    trainer.fit(module)
    judges = module.judges.eval()
    judges.save(out_dir)
    return judges
