"""Evaluation metrics as ``torchmetrics.Metric``s (sum states, so they reduce correctly under DDP).

- ``IdentityPreservation``: the paper's IP (App. D): MTCNN face crop + FaceNet (VGGFace2) cosine.
- ``PromptConsistency``: the paper's PC: CLIP image-text cosine of the clean prompt, also in
  torchmetrics' CLIPScore scale (``max(100 * cos, 0)``).
- ``Disentanglement`` (ours): how much a subject swap changes pixels outside / inside the subject.
- ``LayoutDiversity`` (ours): mean pairwise ``1 - MS-SSIM`` across seeds of one prompt and subject.
"""

from __future__ import annotations

import itertools
import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import Metric
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

log = logging.getLogger(__name__)

# The protocol's detector settings (protocol.json, identity_metric.detector).
MTCNN_SETTINGS = dict(image_size=160, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709,
                      post_process=True, keep_all=True)
RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS (test-only: identity scores are meaningless)"


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (n, 3, H, W) float in [0, 1]."""
    from moa.data.transforms import image_to_tensor

    return torch.stack([image_to_tensor(i.convert("RGB")) for i in images])


class IdentityPreservation(Metric):
    """``max(cos(FaceNet(face(generated)), FaceNet(face(reference))), 0)``, 0 when no face is found.

    Args:
        weights: path to facenet-pytorch's VGGFace2 state dict (``20180402-114759-vggface2.pt``), or
            ``"download"`` to let facenet-pytorch fetch it (needs the network).
        allow_random_weights: without ``weights``, use a randomly initialised FaceNet. Only for tests
            of the code path; ``weights_label`` then says so and every report carries it.
    """

    full_state_update = False

    def __init__(self, *, weights: str | None = None, allow_random_weights: bool = False, **kwargs):
        super().__init__(**kwargs)
        from facenet_pytorch import MTCNN, InceptionResnetV1

        if weights == "download":
            self.embedder = InceptionResnetV1(pretrained="vggface2")
            self.weights_label = "facenet-pytorch vggface2 (downloaded)"
        elif weights:
            if not os.path.exists(weights):
                raise FileNotFoundError(f"metrics.identity.weights={weights!r}: no such file")
            self.embedder = InceptionResnetV1(classify=False, num_classes=8631)
            self.embedder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            self.weights_label = f"vggface2 from {weights}"
        elif allow_random_weights:
            log.warning("IDENTITY METRIC USES %s", RANDOM_WEIGHTS_LABEL)
            self.embedder = InceptionResnetV1(classify=False)
            self.weights_label = RANDOM_WEIGHTS_LABEL
        else:
            raise ValueError("metrics.identity.weights is not set: give the path of facenet-pytorch's VGGFace2 weights "
                             "(20180402-114759-vggface2.pt), 'download', or allow_random_weights=true for a test-only run")
        self.embedder.eval().requires_grad_(False)
        self.detector = MTCNN(**MTCNN_SETTINGS)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("no_face", torch.tensor(0), dist_reduce_fx="sum")

    @torch.no_grad()
    def embed_faces(self, images: list[Image.Image]) -> list[torch.Tensor | None]:
        """The first detected face of each image, embedded (512,), or None where no face is found."""
        embeddings = []
        for image in images:
            faces = self.detector(image.convert("RGB"))
            if faces is None:
                embeddings.append(None)
                continue
            embeddings.append(F.normalize(self.embedder(faces[:1].to(self.device)), dim=-1)[0])
        return embeddings

    def reference_embedding(self, image: Image.Image) -> torch.Tensor:
        embedding = self.embed_faces([image])[0]
        if embedding is None:
            raise ValueError("no face found in the reference image")
        return embedding

    def update(self, generated: list[Image.Image], references: torch.Tensor) -> None:
        """generated: n images; references: (n, 512) reference embeddings, one per generated image."""
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated images but {len(references)} references")
        for embedding, reference in zip(self.embed_faces(generated), references):
            self.count += 1
            if embedding is None:
                self.no_face += 1
                continue
            self.score_sum += torch.clamp(torch.dot(embedding, reference.to(embedding.device)), min=0.0).double()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"identity": (self.score_sum / count).float(), "no_face_rate": self.no_face.float() / count}


class PromptConsistency(Metric):
    """CLIP image-text cosine (raw, as in the FastComposer and MoA papers) and ``max(100 cos, 0)``.

    Args:
        model: a transformers CLIP folder or hub id (the paper: ``openai/clip-vit-large-patch14``).
    """

    full_state_update = False

    def __init__(self, *, model: str, **kwargs):
        super().__init__(**kwargs)
        from transformers import CLIPModel, CLIPProcessor

        self.clip = CLIPModel.from_pretrained(model).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(model)
        self.model_name = str(model)
        self.add_state("cosine_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("clip_score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images: list[Image.Image], prompts: list[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        outputs = self.clip(**{k: v.to(self.device) for k, v in inputs.items()})
        cosine = (F.normalize(outputs.image_embeds, dim=-1) * F.normalize(outputs.text_embeds, dim=-1)).sum(-1)
        self.cosine_sum += cosine.sum().double()
        self.clip_score_sum += (100 * cosine).clamp(min=0).sum().double()
        self.count += len(images)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"prompt_consistency": (self.cosine_sum / count).float(), "clip_score": (self.clip_score_sum / count).float()}


class Disentanglement(Metric):
    """Pixel change between two images of the same prompt and seed (e.g. subject A vs subject B, or
    subject vs prior-only), split by a subject region: PSNR and mean absolute error outside and inside.

    MoA's claim is that outside the subjects nothing changes: PSNR outside high, error outside low.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for region in ("outside", "inside"):
            self.add_state(f"{region}_squared", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{region}_absolute", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{region}_pixels", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, image_a: torch.Tensor, image_b: torch.Tensor, region: torch.Tensor) -> None:
        """image_a, image_b (n, 3, H, W) in [0, 1]; region (n, 1, H, W) in {0, 1}, 1 = subject."""
        if image_a.shape != image_b.shape or region.shape[-2:] != image_a.shape[-2:]:
            raise ValueError(f"shapes differ: {tuple(image_a.shape)}, {tuple(image_b.shape)}, region {tuple(region.shape)}")
        difference = (image_a.double() - image_b.double())
        for name, weight in (("outside", 1.0 - region.double()), ("inside", region.double())):
            setattr(self, f"{name}_squared", getattr(self, f"{name}_squared") + (difference.pow(2) * weight).sum())
            setattr(self, f"{name}_absolute", getattr(self, f"{name}_absolute") + (difference.abs() * weight).sum())
            setattr(self, f"{name}_pixels", getattr(self, f"{name}_pixels") + weight.sum() * image_a.shape[1])

    def compute(self) -> dict[str, torch.Tensor]:
        results = {}
        for name in ("outside", "inside"):
            pixels = getattr(self, f"{name}_pixels").clamp(min=1)
            mse = getattr(self, f"{name}_squared") / pixels
            results[f"psnr_{name}"] = (10 * torch.log10(1.0 / mse)).float() if mse > 0 else torch.tensor(math.inf)
            results[f"mae_{name}"] = (getattr(self, f"{name}_absolute") / pixels).float()
        return results


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM with as many of the standard five scales as the image size allows (small images
    cannot be downsampled five times with an 11-pixel window)."""
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    scales = max(1, min(5, int(math.log2(min(a.shape[-2:]) / 10)) + 1))
    kept = torch.tensor(betas[:scales])
    return multiscale_structural_similarity_index_measure(a, b, data_range=1.0,
                                                          betas=tuple((kept / kept.sum()).tolist()))


class LayoutDiversity(Metric):
    """Mean pairwise ``1 - MS-SSIM`` of images made from different seeds with the same prompt and
    subject: the paper's "layout variation" claim, measured."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("dissimilarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor) -> None:
        """images (seeds, 3, H, W) in [0, 1], all of one prompt and subject."""
        for i, j in itertools.combinations(range(images.shape[0]), 2):
            self.dissimilarity_sum += (1.0 - ms_ssim(images[i: i + 1], images[j: j + 1])).double()
            self.pairs += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"diversity": (self.dissimilarity_sum / self.pairs.clamp(min=1)).float()}


def subject_region(router_maps: dict[str, torch.Tensor] | None, *, image_size: tuple[int, int],
                   face_boxes: np.ndarray | None = None) -> torch.Tensor:
    """Estimated subject region (1, 1, H, W) of one generated image, from its router maps
    (layer name -> (steps, pixels)) or, failing that, its face boxes (n, 4) as xyxy pixels.

    From the router: mean personalized weight ``1 - R0`` over layers and steps, resized to the image,
    thresholded at the midpoint of its range (the router is trained to send subject pixels to the
    personalized expert). Without router maps (e.g. the no_moa ablation): the detected face boxes,
    grown to cover head and shoulders.
    """
    from moa.models.inputs import pixel_map_to_grid

    height, width = image_size
    if router_maps:
        grids = [F.interpolate(pixel_map_to_grid(1.0 - m.float().mean(0)[None], height, width), size=image_size,
                               mode="bilinear", align_corners=False) for m in router_maps.values()]
        weight = torch.stack(grids).mean(0)
        low, high = weight.min(), weight.max()
        return (weight > (low + high) / 2).float() if high > low else torch.zeros_like(weight)
    region = torch.zeros(1, 1, height, width)
    for x1, y1, x2, y2 in ([] if face_boxes is None else face_boxes):
        grow_w, grow_h = (x2 - x1) * 0.5, (y2 - y1) * 0.5
        region[..., max(0, int(y1 - grow_h)): min(height, int(y2 + 2 * grow_h)),
               max(0, int(x1 - grow_w)): min(width, int(x2 + grow_w))] = 1.0
    return region
