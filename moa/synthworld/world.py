"""Procedural people-in-context scenes written in FastComposer's FFHQ-wild on-disk format.

Every subject is a person-like figure whose identity is a set of discrete attributes (skin, hair
colour and style, shirt colour and pattern) and whose word is "man" or "woman"; the context is a
background and an object. Captions name the subjects and the context, never the identity, so the
identity can only come from the subject image. Masks are exact, since we draw them.

Layout written (the same one ``FFHQWildDataset`` reads)::

    root/image_ids.txt, image_ids_train.txt, image_ids_test.txt
    root/<id[:5]>/<id>.jpg    RGB image
    root/<id[:5]>/<id>.npy    (H, W) integer segment map, values = segment ids, 0 = unlabeled
    root/<id[:5]>/<id>.json   {"caption", "segments": [{"id", "bbox": [x1, y1, x2, y2], "end",
                                                        "coco_label", "word", "reference", "face_bbox"}]}
    root/<id[:5]>/<id>_ref<k>.jpg|.npy   person k alone, another pose, studio background (SynthWorld's
                                        addition; read through ``ReferenceRenders``)
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from moa.data.ffhq import CorruptSampleError, read_raw_sample
from moa.data.stores import FolderStore
from moa.data.transforms import image_to_tensor, mask_bbox, subject_crop
from moa.seeding import derived_seed

log = logging.getLogger(__name__)

# Segment ids of the world's maps: the place 1, people PERSON_SEGMENTS (in caption order), the object 20.
PLACE_SEGMENT = 1
PERSON_SEGMENTS = range(10, 20)
OBJECT_SEGMENT = 20
# derived_seed stream of the described-caption draws (the per-sample reference streams use 0..num_samples-1).
DESCRIBED_STREAM = 10**9
# The arguments a world folder was written with (write_synthetic_ffhq's), read back by a resumed run.
WORLD_FILE = "world.json"
# Scene size of the SynthWorld reproduction (the tiny prior's resolution; the embedded default renders larger).
IMAGE_SIZE = 64

SKIN = {"pale": (241, 206, 180), "tan": (205, 150, 110), "brown": (150, 95, 60), "dark": (90, 56, 38)}
HAIR_COLOUR = {"black": (25, 20, 20), "blond": (235, 200, 90), "red": (180, 60, 30), "grey": (160, 160, 165),
               "blue": (40, 90, 200)}
HAIR_STYLE = ("short", "long", "bald")
SHIRT_COLOUR = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
                "purple": (130, 50, 160), "white": (235, 235, 235)}
SHIRT_PATTERN = ("plain", "striped")
WORDS = ("man", "woman")
BACKGROUNDS = {
    "in a park": ((120, 180, 235), (70, 150, 60), "grass"),
    "on a beach": ((150, 200, 240), (225, 205, 150), "sand"),
    "in a room": ((210, 195, 170), (120, 85, 60), "floor-wood"),
    "at night": ((20, 25, 60), (40, 40, 50), "pavement"),
}
OBJECTS = {"ball": "sports ball", "flower": "potted plant", "cup": "cup"}
OBJECT_COLOUR = {"red": (210, 30, 30), "orange": (240, 140, 20), "pink": (240, 120, 180), "cyan": (40, 200, 210)}


@dataclass(frozen=True)
class Identity:
    """The discrete attributes that make a subject who they are."""

    word: str
    skin: str
    hair_colour: str
    hair_style: str
    shirt_colour: str
    shirt_pattern: str

    @classmethod
    def sample(cls, rng: random.Random) -> Identity:
        return cls(rng.choice(WORDS), rng.choice(list(SKIN)), rng.choice(list(HAIR_COLOUR)), rng.choice(HAIR_STYLE),
                   rng.choice(list(SHIRT_COLOUR)), rng.choice(SHIRT_PATTERN))


def _draw_person(canvas: ImageDraw.ImageDraw, labels: ImageDraw.ImageDraw, identity: Identity, *, cx: float,
                 ground: float, height: float, segment_id: int, arm_up: bool, head_scale: float = 1.0
                 ) -> tuple[tuple[float, float], tuple[float, float, float, float]]:
    """Draw one figure standing on ``ground``; return where its hand is and its head's box (face and
    hair, long hair included; unclipped). ``head_scale`` enlarges the head (skin and hair); the torso
    keeps its size and the legs shorten, so the figure's height, and with it how often a head leaves
    the canvas, stays the same."""
    head_r = height * 0.13 * head_scale
    head_cy = ground - height + head_r
    body_top, body_bottom = head_cy + head_r, ground - height * (0.35 - 0.26 * (head_scale - 1.0))
    half_w = height * (0.17 if identity.word == "man" else 0.14)
    skin, shirt = SKIN[identity.skin], SHIRT_COLOUR[identity.shirt_colour]
    shapes = []
    # legs, body (a dress-like trapezoid for "woman"), arms, head, hair
    shapes.append(("rect", (cx - half_w * 0.8, body_bottom, cx + half_w * 0.8, ground), (60, 60, 80)))
    if identity.word == "man":
        shapes.append(("rect", (cx - half_w, body_top, cx + half_w, body_bottom), shirt))
    else:
        shapes.append(("poly", [(cx - half_w * 0.7, body_top), (cx + half_w * 0.7, body_top),
                                (cx + half_w * 1.3, body_bottom), (cx - half_w * 1.3, body_bottom)], shirt))
    hand = (cx + half_w * 2.0, body_top - height * 0.05) if arm_up else (cx + half_w * 1.8, body_bottom - height * 0.05)
    shapes.append(("line", [(cx + half_w, body_top + 2), hand], skin))
    shapes.append(("line", [(cx - half_w, body_top + 2), (cx - half_w * 1.6, body_bottom - height * 0.05)], skin))
    if identity.hair_style == "long":
        shapes.append(("rect", (cx - head_r * 1.15, head_cy - head_r, cx + head_r * 1.15, head_cy + head_r * 1.6),
                       HAIR_COLOUR[identity.hair_colour]))
    shapes.append(("ellipse", (cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r), skin))
    if identity.hair_style != "bald":
        shapes.append(("chord", (cx - head_r * 1.05, head_cy - head_r * 1.1, cx + head_r * 1.05, head_cy + head_r * 0.6),
                       HAIR_COLOUR[identity.hair_colour]))
    width = max(1, int(height * 0.06))
    for kind, xy, colour in shapes:
        for target, fill in ((canvas, colour), (labels, segment_id)):
            if kind == "rect":
                target.rectangle(xy, fill=fill)
            elif kind == "poly":
                target.polygon(xy, fill=fill)
            elif kind == "line":
                target.line(xy, fill=fill, width=width)
            elif kind == "ellipse":
                target.ellipse(xy, fill=fill)
            else:
                target.chord(xy, 180, 360, fill=fill)
    if identity.shirt_pattern == "striped":
        for y in np.arange(body_top + 2, body_bottom, max(2.0, height * 0.06)):
            canvas.line([(cx - half_w * 0.9, y), (cx + half_w * 0.9, y)], fill=(20, 20, 20), width=1)
    head_bottom = head_cy + head_r * (1.6 if identity.hair_style == "long" else 1.0)
    return hand, (cx - head_r * 1.15, head_cy - head_r * 1.1, cx + head_r * 1.15, head_bottom)


def render_scene(rng: random.Random, identities: list[Identity], *, size: int, described: bool = False,
                 head_scale: float = 1.0, object_scale: float = 1.0, figure_scale: float = 1.0
                 ) -> tuple[Image.Image, np.ndarray, dict]:
    """One scene: image, segment map and FFHQ-wild annotation for ``identities`` (1 or 2 people).
    ``described``: the caption names each person's identity attributes (``identity_details``).
    ``object_scale``: the object this much larger (across) than the default world's, at the same place.
    ``figure_scale``: each person this much larger, magnified about the top of their head (a closer
    camera, as in FFHQ's portraits: the legs leave the bottom edge, the head stays where it was)."""
    place = rng.choice(list(BACKGROUNDS))
    sky, floor, floor_label = BACKGROUNDS[place]
    horizon = int(size * rng.uniform(0.45, 0.65))
    image = Image.new("RGB", (size, size), sky)
    segmap = Image.new("I", (size, size), 0)
    canvas, labels = ImageDraw.Draw(image), ImageDraw.Draw(segmap)
    canvas.rectangle((0, horizon, size, size), fill=floor)
    labels.rectangle((0, horizon, size, size), fill=PLACE_SEGMENT)
    holds = rng.random() < 0.6
    obj, obj_colour = rng.choice(list(OBJECTS)), rng.choice(list(OBJECT_COLOUR))

    slots = sorted(rng.sample(range(len(identities) * 2), len(identities)))
    hand, heads = None, {}
    for index, identity in enumerate(identities):
        height = size * rng.uniform(0.55, 0.85)
        ground = min(size - 1.0, horizon + size * rng.uniform(0.15, 0.4) + (height - size * 0.55) * 0.3)
        head_top = ground - height
        height *= figure_scale
        ground = head_top + height
        cx = size * (slots[index] + rng.uniform(0.6, 1.4)) / (len(identities) * 2 + 1)
        person_hand, heads[PERSON_SEGMENTS[index]] = _draw_person(
            canvas, labels, identity, cx=cx, ground=ground, height=height, segment_id=PERSON_SEGMENTS[index],
            arm_up=holds and index == 0, head_scale=head_scale)
        hand = hand or person_hand
    obj_r = size * 0.07 * object_scale
    ox, oy = hand if holds else (size * rng.uniform(0.1, 0.9), size * rng.uniform(0.75, 0.9))
    colour = OBJECT_COLOUR[obj_colour]
    box = (ox - obj_r, oy - obj_r, ox + obj_r, oy + obj_r)
    if obj == "ball":
        canvas.ellipse(box, fill=colour)
        labels.ellipse(box, fill=OBJECT_SEGMENT)
    elif obj == "cup":
        canvas.rectangle((box[0] + obj_r * 0.4, box[1], box[2] - obj_r * 0.4, box[3]), fill=colour)
        labels.rectangle((box[0] + obj_r * 0.4, box[1], box[2] - obj_r * 0.4, box[3]), fill=OBJECT_SEGMENT)
    else:
        stem = max(1, round(2 * object_scale))
        canvas.line([(ox, oy + obj_r), (ox, oy - obj_r * 0.3)], fill=(30, 130, 40), width=stem)
        labels.line([(ox, oy + obj_r), (ox, oy - obj_r * 0.3)], fill=OBJECT_SEGMENT, width=stem)
        canvas.ellipse((ox - obj_r * 0.6, oy - obj_r, ox + obj_r * 0.6, oy - obj_r * 0.1), fill=colour)
        labels.ellipse((ox - obj_r * 0.6, oy - obj_r, ox + obj_r * 0.6, oy - obj_r * 0.1), fill=OBJECT_SEGMENT)

    context = {"place": place, "object": obj, "object_colour": obj_colour, "holding": holds}
    details = [identity_details(identity.__dict__) for identity in identities] if described else None
    caption, ends = compose_caption([identity.word for identity in identities], context, details)
    seg = np.asarray(segmap, dtype=np.int32)
    segments = []
    words = ({PERSON_SEGMENTS[i]: identity.word for i, identity in enumerate(identities)}
             | {OBJECT_SEGMENT: obj, PLACE_SEGMENT: place.split()[-1]})
    coco = ({PERSON_SEGMENTS[i]: "person" for i in range(len(identities))}
            | {OBJECT_SEGMENT: OBJECTS[obj], PLACE_SEGMENT: floor_label})
    for segment_id in sorted(ends):
        ys, xs = np.nonzero(seg == segment_id)
        if len(xs) == 0:
            continue
        segments.append({"id": int(segment_id), "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                         "end": ends[segment_id], "coco_label": coco[segment_id], "word": words[segment_id]})
        head = face_box(heads.get(segment_id), size)
        if head is not None:
            segments[-1]["face_bbox"] = head
    annotation = {"caption": caption, "segments": segments,
                  "identities": [identity.__dict__ for identity in identities], "context": context}
    return image, seg, annotation


def face_box(head: tuple[float, float, float, float] | None, size: int) -> list[int] | None:
    """A drawn head's box in whole pixels, clipped to the ``size`` x ``size`` canvas; None when no head
    or less than 2 pixels of it lie on the canvas (a head cut off by a close camera has no face box)."""
    if head is None:
        return None
    x1, y1 = max(0, int(np.floor(head[0]))), max(0, int(np.floor(head[1])))
    x2, y2 = min(size, int(np.ceil(head[2]))), min(size, int(np.ceil(head[3])))
    return [x1, y1, x2, y2] if x2 - x1 >= 2 and y2 - y1 >= 2 else None


def compose_caption(words: list[str], context: dict, details: list[str] | None = None) -> tuple[str, dict[int, int]]:
    """The world's caption for people called ``words`` in ``context`` (keys place, object,
    object_colour, holding), and the character index where each noun phrase ends (FastComposer's
    "end"), by segment id (``PERSON_SEGMENTS``, ``OBJECT_SEGMENT``, ``PLACE_SEGMENT``). ``details``
    (one per person) follow each person's word, e.g. "a man with tan skin, ... shirt next to ..."; the
    noun phrase still ends at the word."""
    parts, ends = [], {}
    for index, word in enumerate(words):
        if index:
            parts.append(" and ")
        parts.append(f"a {word}")
        ends[PERSON_SEGMENTS[index]] = len("".join(parts))
        if details:
            parts.append(f" {details[index]}")
    parts.append(" holding " if context["holding"] else " next to ")
    parts.append(f"a {context['object_colour']} {context['object']}")
    ends[OBJECT_SEGMENT] = len("".join(parts))
    parts.append(f" {context['place']}")
    caption = "".join(parts)
    ends[1] = len(caption)
    return caption, ends


STUDIO_BACKGROUNDS = ((128, 128, 128), (70, 90, 140), (230, 230, 225), (150, 120, 160))


def render_reference(rng: random.Random, identity: Identity, *, size: int, head_scale: float = 1.0,
                     background: tuple[int, int, int] | None = None) -> tuple[Image.Image, np.ndarray]:
    """The subject alone, in another pose and on a studio background: an identity image that shares
    neither the target's pose nor its context. Segment map: 1 on the figure, 0 elsewhere.
    ``background``: this colour instead of the drawn one; the pose is the same either way (the draw
    is made regardless), so one figure can be shown on every studio colour."""
    drawn = rng.choice(STUDIO_BACKGROUNDS)
    image = Image.new("RGB", (size, size), background or drawn)
    segmap = Image.new("I", (size, size), 0)
    _draw_person(ImageDraw.Draw(image), ImageDraw.Draw(segmap), identity, cx=size * rng.uniform(0.4, 0.6),
                 ground=size * 0.95, height=size * rng.uniform(0.75, 0.9), segment_id=1, arm_up=rng.random() < 0.5,
                 head_scale=head_scale)
    return image, np.asarray(segmap, dtype=np.int32)


def sample_id(index: int) -> str:
    return f"{index:08d}"


def sample_dir(root: Path, image_id: str) -> Path:
    return Path(root) / image_id[:5]


def write_synthetic_ffhq(root: str | os.PathLike, *, num_samples: int = 64, size: int = 128, seed: int = 0,
                         two_subject_fraction: float = 0.3, test_fraction: float = 0.125,
                         described_fraction: float = 0.0, head_scale: float = 1.0,
                         object_scale: float = 1.0, figure_scale: float = 1.0) -> Path:
    """Render ``num_samples`` scenes into ``root`` in the FFHQ-wild layout; atomic (temp dir + rename).

    ``described_fraction``: the share of scenes whose caption also names their people's identity
    attributes, as web captions sometimes describe a person (the prior's world: a prior that never read
    "red hair" has no text path that draws it). Drawn from a generator of its own, so the scenes are
    the same whatever the fraction. ``head_scale``: heads this much larger than the default world's
    (``_draw_person``); ``object_scale``: objects this much larger across, ``figure_scale``: people
    this much larger (``render_scene``; reference renders keep their size). The
    arguments are recorded in ``root/world.json``. Does nothing if ``root`` already holds a complete
    data set (training runs point at an existing world this way).
    """
    root = Path(root)
    if (root / "image_ids.txt").exists():
        return root
    arguments = {"num_samples": num_samples, "size": size, "seed": seed, "two_subject_fraction": two_subject_fraction,
                 "test_fraction": test_fraction, "described_fraction": described_fraction, "head_scale": head_scale,
                 "object_scale": object_scale, "figure_scale": figure_scale}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    rng, describe_rng = random.Random(seed), random.Random(derived_seed(seed, DESCRIBED_STREAM))
    ids = []
    for index in tqdm(range(num_samples), desc="rendering synthetic FFHQ-wild", disable=num_samples < 200):
        count = 2 if rng.random() < two_subject_fraction else 1
        identities = [Identity.sample(rng) for _ in range(count)]
        described = describe_rng.random() < described_fraction
        image, seg, annotation = render_scene(rng, identities, size=size, described=described,
                                              head_scale=head_scale, object_scale=object_scale,
                                              figure_scale=figure_scale)
        image_id = sample_id(index)
        folder = sample_dir(staging, image_id)
        folder.mkdir(exist_ok=True)
        # Reference renders draw from their own generator, so the scenes do not depend on them.
        reference_rng = random.Random(derived_seed(seed, index))
        for segment in annotation["segments"]:
            if segment["coco_label"] == "person":
                slot = segment["id"] - PERSON_SEGMENTS.start
                reference, reference_seg = render_reference(reference_rng, identities[slot], size=size,
                                                            head_scale=head_scale)
                segment["reference"] = f"{image_id}_ref{slot}"
                reference.save(folder / f"{segment['reference']}.jpg", quality=95)
                np.save(folder / f"{segment['reference']}.npy", reference_seg)
        image.save(folder / f"{image_id}.jpg", quality=95)
        np.save(folder / f"{image_id}.npy", seg)
        (folder / f"{image_id}.json").write_text(json.dumps(annotation))
        ids.append(image_id)
    num_test = max(1, int(len(ids) * test_fraction))
    (staging / "image_ids.txt").write_text("\n".join(ids) + "\n")
    (staging / "image_ids_train.txt").write_text("\n".join(ids[:-num_test]) + "\n")
    (staging / "image_ids_test.txt").write_text("\n".join(ids[-num_test:]) + "\n")
    (staging / WORLD_FILE).write_text(json.dumps(arguments, indent=2) + "\n")
    try:
        staging.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d synthetic FFHQ-wild samples to %s", num_samples, root)
    return root


def read_reference(store, reference_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference render from a store: image (3, H, W) in [0, 1] and figure mask (H, W) {0, 1}."""
    with Image.open(io.BytesIO(store.read(reference_id, "jpg"))) as opened:
        image = image_to_tensor(opened.convert("RGB"))
    mask = torch.from_numpy(np.load(io.BytesIO(store.read(reference_id, "npy")), allow_pickle=False) > 0).float()
    return image, mask


class ReferenceRenders:
    """Subject source for ``FFHQWildDataset`` (``data.subject_source``): each subject's reference
    render (another pose, studio background) instead of its crop from the target image, so identity
    cannot be copied from the target's pose."""

    def __call__(self, store, image_id: str, segment: dict, image: torch.Tensor, mask: torch.Tensor):
        reference_id = segment.get("reference")
        if not reference_id:
            raise CorruptSampleError(f"{image_id}: segment {segment['id']} has no reference render "
                                     "(ReferenceRenders needs SynthWorld data)")
        try:
            reference, reference_mask = read_reference(store, reference_id)
        except (OSError, ValueError) as error:
            raise CorruptSampleError(f"{image_id}: unreadable reference render {reference_id} ({error})") from error
        bbox = mask_bbox(reference_mask)
        if bbox is None:
            raise CorruptSampleError(f"{image_id}: reference render {reference_id} has an empty mask")
        return reference, reference_mask, bbox


def observable(attribute: str, identity: dict) -> bool:
    """Whether ``attribute`` can be seen at all on ``identity`` (a bald figure shows no hair colour)."""
    return not (attribute == "hair_colour" and identity["hair_style"] == "bald")


def identity_details(identity: dict) -> str:
    """The identity attributes of a person in words, e.g. "with pale skin, long red hair and a green
    striped shirt"."""
    hair = "no hair" if identity["hair_style"] == "bald" else f"{identity['hair_style']} {identity['hair_colour']} hair"
    return f"with {identity['skin']} skin, {hair} and a {identity['shirt_colour']} {identity['shirt_pattern']} shirt"


def describe_identity(identity: dict) -> str:
    """A caption naming every identity attribute, e.g. "a woman with pale skin, long red hair and a
    green striped shirt": the analogue of the web captions CLIP learns identity from. (Scene captions
    name the identity only in the prior's world, ``described_fraction``; stage 2 never sees them.)"""
    return f"a {identity['word']} {identity_details(identity)}"


def subject_crops(root: str | os.PathLike, split: str, spec, *, sources: tuple[str, ...] = ("scene", "reference")
                  ) -> tuple[torch.Tensor, list[dict]]:
    """Every person of a split as the image encoder sees them (``subject_crop``: background masked to
    the encoder's mean colour, square, normalised): cut from their scene and/or from their reference
    render. Returns pixels (n, 3, spec.size, spec.size) and each crop's identity (a dict of attributes)."""
    store = FolderStore(root)
    pixels, identities = [], []
    for image_id in store.split(split):
        raw = read_raw_sample(store, image_id)
        annotation = json.loads(store.read(image_id, "json"))
        scene = image_to_tensor(raw.image)
        segments = torch.from_numpy(raw.segments.astype(np.int64))
        for segment in raw.subjects:
            identity = annotation["identities"][segment["id"] - PERSON_SEGMENTS.start]
            if "scene" in sources:
                pixels.append(subject_crop(scene, (segments == segment["id"]).float(), segment["bbox"], spec))
                identities.append(identity)
            if "reference" in sources and segment.get("reference"):
                reference, mask = read_reference(store, segment["reference"])
                pixels.append(subject_crop(reference, mask, mask_bbox(mask), spec))
                identities.append(identity)
    return torch.stack(pixels), identities


def caption_corpus(num_samples: int = 2000, seed: int = 1) -> list[str]:
    """Captions of the synthetic world, for training the tiny tokenizer."""
    rng = random.Random(seed)
    captions = []
    for _ in range(num_samples):
        count = 2 if rng.random() < 0.3 else 1
        _, _, annotation = render_scene(rng, [Identity.sample(rng) for _ in range(count)], size=16)
        captions.append(annotation["caption"])
    return captions
