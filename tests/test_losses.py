"""Losses on inputs small enough to compute by hand."""

import pytest
import torch
from diffusers import DDPMScheduler

from moa.models.inputs import pixel_map_to_grid
from moa.models.losses import (
    BackgroundInfluenceLoss,
    MaskedDenoisingLoss,
    ObjectLocalizationLoss,
    RouterLoss,
    min_snr_weights,
)


def test_masked_loss_counts_foreground_only_and_normalises_by_area():
    prediction = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    mask = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    # foreground pixel (1, 1): squared errors 16 and 4 over 1 pixel x 2 channels
    assert MaskedDenoisingLoss()(prediction, target, mask).item() == pytest.approx(10.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_clipped_snr_over_the_snr_by_hand(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)  # signal over noise variance; > 5 early, < 5 late
    gamma = 5.0
    denominator = snr + 1 if prediction_type == "v_prediction" else snr
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / denominator
    assert snr[0] > gamma > snr[-1], "the timesteps must straddle gamma for the test to mean anything"
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, gamma).double(), expected, rtol=1e-5, atol=0)


def test_router_loss_pushes_background_to_prior_and_leaves_foreground_free():
    foreground = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # one layer at latent resolution: R0 = 0.25 on the foreground pixel, 0.5 elsewhere
    r0 = torch.tensor([[0.25, 0.5, 0.5, 0.5]])
    loss, mean_map = RouterLoss()({"layer": r0}, foreground)
    assert loss.item() == pytest.approx(3 * 0.5 ** 2)  # eq. 9: a squared norm, summed over the pixels
    assert mean_map.shape == (1, 1, 2, 2)
    # changing the foreground pixel's weight does not change the loss
    loss_fg_changed, _ = RouterLoss()({"layer": torch.tensor([[0.0, 0.5, 0.5, 0.5]])}, foreground)
    assert loss_fg_changed.item() == pytest.approx(loss.item())
    # all background on the prior: zero
    zero, _ = RouterLoss()({"layer": torch.tensor([[0.0, 1.0, 1.0, 1.0]])}, foreground)
    assert zero.item() == 0.0


def test_router_loss_averages_layers_after_resizing():
    foreground = torch.zeros(1, 1, 4, 4)
    low = torch.full((1, 4), 1.0)  # a 2x2 layer all on the prior
    high = torch.full((1, 16), 0.0)  # a 4x4 layer all on the personalized expert
    loss, mean_map = RouterLoss()({"low": low, "high": high}, foreground)
    assert torch.allclose(mean_map, torch.full((1, 1, 4, 4), 0.5))
    assert loss.item() == pytest.approx(16 * 0.25)


def test_router_loss_sums_pixels_per_image_then_averages_images_or_takes_the_plain_mean():
    foreground = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # image 2: all subject
    r0 = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # image 1: background errors 1^2 + 0.5^2 + 0 = 1.25; image 2 has no background: 0
    summed, _ = RouterLoss()({"l": r0}, foreground)
    assert summed.item() == pytest.approx((1.25 + 0.0) / 2)
    mean, _ = RouterLoss("mean")({"l": r0}, foreground)
    assert mean.item() == pytest.approx(1.25 / 8)
    with pytest.raises(ValueError, match="router_loss_reduction"):
        RouterLoss("sum")


def test_router_loss_foreground_weight_pulls_subject_pixels_to_the_personalized_expert():
    foreground = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    r0 = torch.tensor([[0.25, 0.5, 0.5, 1.0]])
    # background: 0.5^2 + 0.5^2 + 0 = 0.5; foreground: 2 * 0.25^2 = 0.125
    loss, _ = RouterLoss(foreground_weight=2.0)({"layer": r0}, foreground)
    assert loss.item() == pytest.approx(0.5 + 0.125)
    paper, _ = RouterLoss()({"layer": r0}, foreground)
    assert paper.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="router_loss_foreground_weight"):
        RouterLoss(foreground_weight=-1.0)


def test_background_influence_loss_sums_background_energy_per_image_over_the_layer_mean():
    foreground = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # image 2: all subject
    low = torch.tensor([[4.0], [5.0]])  # a 1x1 layer: its energy spread over the 2x2 latents
    high = torch.tensor([[8.0, 2.0, 0.0, 6.0], [7.0, 7.0, 7.0, 7.0]])
    loss, mean_map = BackgroundInfluenceLoss()({"low": low, "high": high}, foreground)
    # image 1, layer mean (4 + high) / 2 = 6, 3, 2, 5 -> background 3 + 2 + 5; image 2 has no background
    assert torch.allclose(mean_map[0].flatten(), torch.tensor([6.0, 3.0, 2.0, 5.0]))
    assert loss.item() == pytest.approx((10.0 + 0.0) / 2)
    # the subject's own pixels are free
    high[0, 0] = 100.0
    assert BackgroundInfluenceLoss()({"low": low, "high": high}, foreground)[0].item() == pytest.approx(5.0)


def test_object_loss_is_background_mean_minus_foreground_mean_over_valid_subjects():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, 0, 0] = 1.0
    attention = torch.zeros(1, 4, 2)
    attention[0, :, 0] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    attention[0, :, 1] = 5.0  # padded subject: must not count
    loss = ObjectLocalizationLoss()({"l": attention}, masks, torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(0.1 - 0.7, abs=1e-4)


def test_object_loss_averages_subjects_per_sample_then_samples_as_fastcomposer():
    """Sample 0: two subjects with losses -0.6 and -0.2 -> -0.4; sample 1: one subject, -1.0;
    sample 2: no subject (condition dropped) -> 0. Batch: (-0.4 - 1.0 + 0) / 3. Pooling all subjects
    of the batch instead would give (-0.6 - 0.2 - 1.0) / 3 = -0.6."""
    masks = torch.zeros(3, 2, 2, 2)
    masks[:, 0, 0, 0] = 1.0
    masks[:, 1, 1, 1] = 1.0
    attention = torch.zeros(3, 4, 2)
    attention[0, :, 0] = torch.tensor([0.6, 0.0, 0.0, 0.0])  # fg 0.6, bg 0 -> -0.6
    attention[0, :, 1] = torch.tensor([0.0, 0.0, 0.0, 0.2])  # -> -0.2
    attention[1, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # -> -1.0
    attention[2] = 0.9  # never counted
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    loss = ObjectLocalizationLoss()({"l": attention}, masks, valid)
    assert loss.item() == pytest.approx((-0.4 - 1.0) / 3, abs=1e-4)


def test_pixel_map_to_grid_checks_resolution():
    grid = pixel_map_to_grid(torch.arange(8.0)[None], 4, 8)
    assert grid.shape == (1, 1, 2, 4)
    assert grid[0, 0, 1, 0].item() == 4.0
    with pytest.raises(ValueError, match="aspect ratio"):
        pixel_map_to_grid(torch.zeros(1, 7), 4, 4)
