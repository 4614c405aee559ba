"""Image and caption transforms shared by training data, inference and metrics, and the image encoder's input spec.

Kept free of any model code so DataLoader workers import only torch, PIL and transformers' processor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class SubjectImageSpec:
    """How the image encoder wants its input (read from its ``preprocessor_config.json``)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SubjectImageSpec:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(path)
        return cls(size=int(processor.crop_size["height"]), mean=tuple(processor.image_mean), std=tuple(processor.image_std))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def resize_center_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): shorter side to ``size``, then centre crop."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    x = F.interpolate(x[None], size=(new_h, new_w), mode=mode, **kwargs)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, top: top + size, left: left + size]


def subject_crop(image: torch.Tensor, mask: torch.Tensor, bbox: list[int], spec: SubjectImageSpec,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The image encoder's input for one subject: its box, background set to the encoder's mean
    colour (FastComposer masks the background out so identity comes from the subject alone), padded
    to a square and resized. image (3, H, W) in [0, 1], mask (H, W) -> (3, size, size) normalised.
    ``augment`` (training only) maps the square (3, size, size) in [0, 1] before normalisation."""
    height, width = mask.shape
    x1, y1, x2, y2 = (int(v) for v in bbox)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, max(x2, x1 + 1)), min(height, max(y2, y1 + 1))
    mean = torch.tensor(spec.mean)[:, None, None]
    crop = torch.where(mask[None, y1:y2, x1:x2] > 0, image[:, y1:y2, x1:x2], mean)
    side = max(crop.shape[-2:])
    square = mean.expand(3, side, side).clone()
    top, left = (side - crop.shape[1]) // 2, (side - crop.shape[2]) // 2
    square[:, top: top + crop.shape[1], left: left + crop.shape[2]] = crop
    square = F.interpolate(square[None], size=(spec.size, spec.size), mode="bicubic", antialias=True,
                           align_corners=False)[0].clamp(0, 1)
    if augment is not None:
        square = augment(square).clamp(0, 1)
    return (square - mean) / torch.tensor(spec.std)[:, None, None]


@dataclass(frozen=True)
class SubjectAugmentation:
    """FastComposer's augmentation of the subject image (its ``get_object_transforms``), so the experts
    cannot learn to copy the target's pose, framing and lighting from the subject crop.

    Each part is applied with its own probability (FastComposer's values by default): zoom in about
    the centre (1..``max_zoom``), rotation (+-``degrees``), colour jitter (brightness, contrast,
    saturation, hue), Gaussian blur, greyscale, horizontal flip, elastic warp. Areas uncovered by a
    rotation or warp are filled with ``fill`` (the encoder's mean colour, the crops' background).
    Randomness comes from the global generator: callers seed it per sample (``FFHQWildDataset``).
    """

    zoom_p: float = 0.5
    max_zoom: float = 2.0
    rotate_p: float = 0.75
    degrees: float = 30.0
    jitter_p: float = 0.5
    jitter: float = 0.5
    blur_p: float = 0.5
    grayscale_p: float = 0.1
    flip_p: float = 0.5
    elastic_p: float = 0.5

    def transform(self, fill: tuple[float, float, float]):
        from torchvision.transforms import v2

        fill = list(fill)
        jitter = min(self.jitter, 0.5)  # hue accepts at most 0.5
        return v2.Compose([
            v2.RandomApply([v2.RandomAffine(degrees=0, scale=(1.0, self.max_zoom), fill=fill)], p=self.zoom_p),
            v2.RandomApply([v2.RandomAffine(degrees=self.degrees, fill=fill)], p=self.rotate_p),
            v2.RandomApply([v2.ColorJitter(self.jitter, self.jitter, self.jitter, jitter)], p=self.jitter_p),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=self.blur_p),
            v2.RandomGrayscale(p=self.grayscale_p),
            v2.RandomHorizontalFlip(p=self.flip_p),
            v2.RandomApply([v2.ElasticTransform(fill=fill)], p=self.elastic_p),
        ])


def mask_bbox(mask: torch.Tensor) -> list[int] | None:
    """(H, W) mask -> ``[x1, y1, x2, y2]`` of its nonzero pixels (exclusive ends), None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def empty_caption_ids(tokenizer) -> torch.Tensor:
    """(tokens,) ids of the empty caption, used where the condition is dropped."""
    return tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids[0]
