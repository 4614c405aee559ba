"""FastComposer's FFHQ-wild layout (images, BLIP-2 captions, Mask2Former segment maps) as a Dataset.

    root/image_ids.txt, image_ids_train.txt, image_ids_test.txt
    root/<id[:5]>/<id>.jpg   image
    root/<id[:5]>/<id>.npy   (H, W) integer segment map, values = segment ids
    root/<id[:5]>/<id>.json  {"caption": str, "segments": [{"id", "bbox", "end", "coco_label"}, ...]}

``bbox`` is ``[x1, y1, x2, y2]`` in pixels (columns, rows), whatever FastComposer's comment says
(its code crops ``image[:, w1:w2, h1:h2]`` from a (C, H, W) tensor). ``end`` is the character index
just past the segment's noun phrase in the caption. Subjects are the ``person`` segments.

Our one optional addition: a person segment may carry ``face_bbox`` ([x1, y1, x2, y2], pixels), the box
of the face and hair it is recognised by (a face detector's box on photos; SynthWorld writes the drawn
head's). ``data.face_regions`` reads it, for ``model.face_loss_weight``; a person without it has no face
region (a face turned away, or cut off by the frame).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from moa.data.stores import latent_member, open_store
from moa.data.subjects import MAX_SUBJECTS, token_positions
from moa.data.transforms import SubjectAugmentation, SubjectImageSpec, image_to_tensor, resize_center_crop, subject_crop
from moa.seeding import derived_seed

log = logging.getLogger(__name__)


class CorruptSampleError(ValueError):
    """One sample cannot be used (its id and the reason are in the message)."""


class CorruptDataError(RuntimeError):
    """Too many samples were corrupt: the data set itself is probably broken."""


@dataclass
class RawSample:
    image: Image.Image
    segments: np.ndarray  # (H, W) int
    caption: str
    subjects: list[dict]  # person segments sorted by their position in the caption


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_box(image_id: str, segment: dict, field: str, size: tuple[int, int]) -> list[int]:
    """``segment[field]`` checked to be an [x1, y1, x2, y2] pixel box and clipped to the image ``size`` = (H, W)."""
    box = segment.get(field)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and np.isfinite(v) for v in box)):
        raise CorruptSampleError(f"{image_id}: segment {segment['id']} {field}={box!r}, expected [x1, y1, x2, y2] numbers")
    height, width = size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    clipped = [max(0, x1), max(0, y1), min(width, x2), min(height, y2)]
    if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
        raise CorruptSampleError(f"{image_id}: segment {segment['id']} {field}={box} is inverted or lies outside the "
                                 f"{width}x{height} image (x2 > x1 and y2 > y1 expected, in pixels)")
    return clipped


def flipped_box(box: list[int], width: int) -> list[int]:
    """An [x1, y1, x2, y2] box of an image ``width`` pixels wide, mirrored left to right."""
    return [width - box[2], box[1], width - box[0], box[3]]


def checked_person(image_id: str, segment, caption: str, present: set[int], size: tuple[int, int]) -> dict:
    """One person segment with every field checked and its boxes clipped to the image ``size`` = (H, W);
    raises ``CorruptSampleError`` naming the field and what was expected."""
    if not isinstance(segment, dict):
        raise CorruptSampleError(f"{image_id}: a segment is {type(segment).__name__}, expected an object")
    for field in ("id", "end"):
        if not _is_int(segment.get(field)):
            raise CorruptSampleError(f"{image_id}: segment field {field!r} = {segment.get(field)!r}, expected an integer")
    if segment["id"] not in present:
        raise CorruptSampleError(f"{image_id}: segment id {segment['id']} is absent from the segment map")
    if not 0 < segment["end"] <= len(caption):
        raise CorruptSampleError(f"{image_id}: segment {segment['id']} end={segment['end']} is outside the "
                                 f"caption ({len(caption)} characters)")
    checked = {**segment, "bbox": checked_box(image_id, segment, "bbox", size)}
    if segment.get("face_bbox") is not None:
        checked["face_bbox"] = checked_box(image_id, segment, "face_bbox", size)
    return checked


def read_raw_sample(store, image_id: str) -> RawSample:
    """Read and check one sample; raise ``CorruptSampleError`` naming the id and the problem."""
    try:
        annotation = json.loads(store.read(image_id, "json"))
        caption, segments_meta = annotation["caption"], annotation["segments"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptSampleError(f"{image_id}: unreadable annotation {image_id}.json ({error})") from error
    if not isinstance(caption, str) or not isinstance(segments_meta, list):
        raise CorruptSampleError(f"{image_id}: {image_id}.json has caption {type(caption).__name__} and segments "
                                 f"{type(segments_meta).__name__}, expected a string and a list")
    try:
        with Image.open(io.BytesIO(store.read(image_id, "jpg"))) as image:
            image.load()  # forces a full decode, so truncated files fail here
            image = image.convert("RGB")
    except OSError as error:
        raise CorruptSampleError(f"{image_id}: unreadable image {image_id}.jpg ({error})") from error
    try:
        segments = np.load(io.BytesIO(store.read(image_id, "npy")), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CorruptSampleError(f"{image_id}: unreadable segment map {image_id}.npy ({error})") from error
    if segments.shape != (image.height, image.width):
        raise CorruptSampleError(f"{image_id}: segment map {segments.shape} != image {(image.height, image.width)}")
    present = set(np.unique(segments).tolist())
    subjects = [checked_person(image_id, segment, caption, present, segments.shape) for segment in segments_meta
                if not isinstance(segment, dict) or segment.get("coco_label") == "person"]
    if not subjects:
        raise CorruptSampleError(f"{image_id}: no person segment")
    subjects.sort(key=lambda s: s["end"])
    return RawSample(image=image, segments=segments, caption=caption, subjects=subjects)


# (store, image id, person segment, target image (3, H, W) in [0, 1], its mask (H, W))
#   -> (image, mask, bbox) the image encoder's input is cut from
SubjectSource = Callable[[object, str, dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[int]]]


def target_subject(store, image_id: str, segment: dict, image: torch.Tensor, mask: torch.Tensor):
    """The default subject image: the subject as it appears in the target image (FastComposer's way)."""
    return image, mask, segment["bbox"]


def target_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> the U-Net's target image (3, size, size) in [-1, 1], centre-cropped."""
    return resize_center_crop(image, size, "bilinear").clamp(0, 1) * 2.0 - 1.0


class FFHQWildDataset(Dataset):
    """Training samples from an FFHQ-wild folder.

    Each item::

        pixel_values          (3, R, R) float in [-1, 1]; or, with ``cached_latents``,
        latent_moments        (8, R/8, R/8) the VAE's latent mean and log-variance (``moa.data.latents``)
        input_ids             (T,) long, caption tokens padded to the tokenizer's max length
        subject_pixel_values  (S, 3, r, r) clip inputs (zeros where padded)
        subject_token_index   (S,) long, position of each subject's word (0 where padded)
        subject_valid         (S,) bool
        subject_masks         (S, R, R) float {0, 1}
        subject_face_masks    (S, R, R) float {0, 1}, with ``face_regions``: the part of each subject's
                              mask inside its ``face_bbox`` (zeros for a person without one)
        index                 () long, dataset index of the sample actually returned

        skipped               () long, how many samples were skipped before this one was found

    with ``S = max_subjects``. A sample that fails in any way (unreadable file, missing or mistyped
    field, a box outside the image ...) is skipped for the next index, and logged with its id and the
    reason. The count travels with the item, so the skip totals can be summed over loader workers
    and ranks (``FFHQWildDataModule`` does, and applies ``data.max_corrupt_fraction`` to them).
    """

    def __init__(self, root: str | Path, *, tokenizer: PreTrainedTokenizerBase, subject_image_spec: SubjectImageSpec,
                 resolution: int, split: str = "train", data_format: str = "folder", max_subjects: int = MAX_SUBJECTS,
                 subject_source: SubjectSource | None = None, augmentation: SubjectAugmentation | None = None,
                 target_flip_p: float = 0.0, cached_latents: bool = False, face_regions: bool = False,
                 seed: int = 0):
        self.root = Path(root)
        self.face_regions = face_regions
        self.cached_latents = cached_latents
        self.store = open_store(root, data_format)
        if not 1 <= max_subjects <= MAX_SUBJECTS:
            raise ValueError(f"data.max_subjects={max_subjects}: expected 1..{MAX_SUBJECTS}")
        if subject_source is not None and not callable(subject_source):
            raise TypeError(f"data.subject_source={subject_source!r}: expected null (the subject cut from the "
                            "target image) or a callable such as moa.synthworld.world.ReferenceRenders")
        self.subject_source = subject_source or target_subject
        self.ids = self.store.split(split)
        if not self.ids:
            raise ValueError(f"data.root={str(root)!r}: split {split!r} lists no image ids")
        self.tokenizer = tokenizer
        self.spec = subject_image_spec
        self.resolution = resolution
        self.max_subjects = max_subjects
        self.augment = augmentation.transform(subject_image_spec.mean) if augmentation is not None else None
        self.target_flip_p, self.seed = target_flip_p, seed
        self.skipped: list[str] = []  # ids skipped by this process (each loader worker has its own list)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``item``: an index (no augmentation), or (index, draw) from ``ResumableStreamSampler``: the
        draw's number seeds the augmentation, so a resumed run augments exactly as an uninterrupted one."""
        index, draw = item if isinstance(item, tuple) else (item, None)
        for offset in range(len(self.ids)):
            candidate = (index + offset) % len(self.ids)
            try:
                if draw is None or (self.augment is None and self.target_flip_p == 0):
                    sample = self._load(candidate)
                else:
                    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
                        torch.manual_seed(derived_seed(self.seed, draw))
                        sample = self._load(candidate, augmented=True)
                return {**sample, "skipped": torch.tensor(offset)}
            except Exception as error:  # noqa: BLE001 (one bad sample must never stop a run; the totals do)
                reason = str(error) if isinstance(error, CorruptSampleError) else f"{type(error).__name__}: {error}"
                self.skipped.append(self.ids[candidate])
                log.warning("skipping sample %s: %s", self.ids[candidate], reason)
        raise CorruptDataError(f"data.root={str(self.root)!r}: no usable sample at all (first skipped: "
                               f"{self.skipped[:5]})")

    def caption(self, index: int) -> str:
        return json.loads(self.store.read(self.ids[index], "json"))["caption"]

    def tokenize(self, caption: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        encoded = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_offsets_mapping=True)
        return torch.tensor(encoded["input_ids"]), encoded["offset_mapping"]

    def _load(self, index: int, augmented: bool = False) -> dict[str, torch.Tensor]:
        image_id = self.ids[index]
        raw = read_raw_sample(self.store, image_id)
        input_ids, offsets = self.tokenize(raw.caption)
        positions = token_positions(offsets, [int(s["end"]) for s in raw.subjects], raw.caption)
        # A subject whose word was cut off by the tokenizer's length cannot be bound: drop it, never
        # bind it to whatever token sits at a stale position.
        kept = [(s, p) for s, p in zip(raw.subjects, positions) if p is not None][: self.max_subjects]
        if not kept:
            raise CorruptSampleError(f"{image_id}: every subject word lies beyond the tokenizer's length")

        image = image_to_tensor(raw.image)
        segments = torch.from_numpy(raw.segments.astype(np.int64))
        augment = self.augment if augmented else None
        if augmented and torch.rand(()) < self.target_flip_p:  # target image and masks flipped together
            image, segments = image.flip(-1), segments.flip(-1)
            width = image.shape[-1]
            kept = [({**s, **{box: flipped_box(s[box], width) for box in ("bbox", "face_bbox") if box in s}}, p)
                    for s, p in kept]
        size, n = self.resolution, self.max_subjects
        subject_pixels = torch.zeros(n, 3, self.spec.size, self.spec.size)
        subject_masks = torch.zeros(n, size, size)
        face_masks = torch.zeros(n, size, size)
        token_index = torch.zeros(n, dtype=torch.long)
        valid = torch.zeros(n, dtype=torch.bool)
        for slot, (segment, position) in enumerate(kept):
            mask = (segments == int(segment["id"])).float()
            subject_pixels[slot] = subject_crop(*self.subject_source(self.store, image_id, segment, image, mask), self.spec,
                                                augment=augment)
            subject_masks[slot] = resize_center_crop(mask[None], size, "nearest")[0]
            if self.face_regions and "face_bbox" in segment:
                x1, y1, x2, y2 = segment["face_bbox"]
                face = torch.zeros_like(mask)
                face[y1:y2, x1:x2] = mask[y1:y2, x1:x2]
                face_masks[slot] = resize_center_crop(face[None], size, "nearest")[0]
            token_index[slot] = position
            valid[slot] = True
        if self.cached_latents:
            try:
                target = {"latent_moments": torch.from_numpy(
                    np.load(io.BytesIO(self.store.read(*latent_member(image_id, size))), allow_pickle=False))}
            except (OSError, ValueError) as error:
                raise CorruptSampleError(f"{image_id}: unreadable cached latent {latent_member(image_id, size)[0]}.npy "
                                         f"({error})") from error
        else:
            target = {"pixel_values": target_pixels(image, size)}
        return {
            **target,
            "input_ids": input_ids,
            "subject_pixel_values": subject_pixels,
            "subject_token_index": token_index,
            "subject_valid": valid,
            "subject_masks": subject_masks,
            **({"subject_face_masks": face_masks} if self.face_regions else {}),
            "index": torch.tensor(index),
        }
