"""Evaluation metrics: the protocol's face pipeline with real MTCNN weights, and sanity of our own."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from moa.evaluation.metrics import (
    RANDOM_WEIGHTS_LABEL,
    Disentanglement,
    IdentityPreservation,
    LayoutDiversity,
    PromptConsistency,
    subject_region,
)
from moa.evaluation.protocol import load_protocol


@pytest.fixture(scope="module")
def protocol_images():
    protocol = load_protocol()
    return {s: Image.open(protocol.reference_image(s)).convert("RGB") for s in protocol.class_token}


@pytest.fixture(scope="module")
def identity():
    return IdentityPreservation(allow_random_weights=True)


def test_mtcnn_finds_exactly_one_face_in_at_least_14_protocol_images(identity, protocol_images):
    counts = {s: 0 if (f := identity.detector(img)) is None else len(f) for s, img in protocol_images.items()}
    print("faces per protocol image:", counts)
    assert sum(c == 1 for c in counts.values()) >= 14


def test_face_against_itself_scores_one_and_no_face_scores_zero(identity, protocol_images):
    assert identity.weights_label == RANDOM_WEIGHTS_LABEL
    face = protocol_images["000001"]
    reference = identity.reference_embedding(face)
    identity.reset()
    identity.update([face], reference[None])
    assert identity.compute()["identity"].item() == pytest.approx(1.0, abs=1e-5)
    blank = Image.new("RGB", (256, 256), (120, 160, 200))
    identity.update([blank], reference[None])
    result = identity.compute()
    assert result["identity"].item() == pytest.approx(0.5, abs=1e-5)  # (1 + 0) / 2
    assert result["no_face_rate"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 generated images but 1 references"):
        identity.update([face, face], reference[None])


def test_identity_needs_weights_unless_random_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="metrics.identity.weights"):
        IdentityPreservation()
    with pytest.raises(FileNotFoundError, match="metrics.identity.weights"):
        IdentityPreservation(weights=str(tmp_path / "missing.pt"))


def test_prompt_consistency_on_tiny_clip(tiny_dir, protocol_images):
    metric = PromptConsistency(model=str(tiny_dir / "clip"))
    images = [protocol_images["000001"], protocol_images["000612"]]
    metric.update(images, ["a man", "a woman"])
    result = metric.compute()
    assert -1.0 <= result["prompt_consistency"].item() <= 1.0
    assert result["clip_score"].item() == pytest.approx(max(0.0, 100 * result["prompt_consistency"].item()), abs=100)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.update(images, ["a man"])


def test_disentanglement_identical_images_and_changes_only_inside():
    a = torch.rand(2, 3, 32, 32)
    region = torch.zeros(2, 1, 32, 32)
    region[..., 8:20, 8:20] = 1.0
    metric = Disentanglement()
    metric.update(a, a.clone(), region)
    result = metric.compute()
    assert result["psnr_outside"].item() == math.inf and result["mae_outside"].item() == 0.0
    b = a.clone()
    b[..., 10:18, 10:18] = 1.0 - b[..., 10:18, 10:18]
    metric.reset()
    metric.update(a, b, region)
    result = metric.compute()
    assert result["mae_outside"].item() == 0.0 and result["psnr_outside"].item() == math.inf
    assert result["mae_inside"].item() > 0.05 and math.isfinite(result["psnr_inside"].item())


def test_diversity_is_zero_for_copies_and_positive_for_different_images():
    image = torch.rand(1, 3, 64, 64)
    metric = LayoutDiversity()
    metric.update(image.repeat(3, 1, 1, 1))
    assert metric.compute()["diversity"].item() == pytest.approx(0.0, abs=1e-5)
    metric.reset()
    metric.update(torch.rand(3, 3, 64, 64))
    assert metric.compute()["diversity"].item() > 0.5


def test_subject_region_from_router_maps_and_face_boxes():
    r0 = torch.ones(3, 16)  # (steps, pixels) of a 4x4 layer: all prior ...
    r0[:, 5] = 0.0  # ... but one pixel on the personalized expert
    region = subject_region({"layer": r0}, image_size=(32, 32))
    assert region.shape == (1, 1, 32, 32)
    assert region[0, 0, 10, 10] == 1.0 and region[0, 0, 30, 30] == 0.0
    boxes = np.array([[10, 10, 20, 20]])
    region = subject_region(None, image_size=(64, 64), face_boxes=boxes)
    assert region[0, 0, 15, 15] == 1.0 and region[0, 0, 60, 60] == 0.0
