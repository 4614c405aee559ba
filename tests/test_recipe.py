"""The training recipe: augmentation, subject dropout, per-part rates and warm-up, min-SNR, EMA,
validation on held-out subjects, gradient accumulation with exact resume."""

import csv
import json
import shutil

import hydra
import pytest
import torch
from safetensors.torch import load_file

from moa.checks import ConfigError, check_ranges
from moa.models.losses import latent_union_mask
from moa.training.preflight import TRAINING_RANGES, preflight
from moa.training.run import train
from tests.helpers import module_and_batch


def test_parts_get_their_own_rates_and_warm_up(compose_cfg):
    module, _, _ = module_and_batch(compose_cfg, "model.lr_scale.routers=10", "model.lr_scale.prompt_encoder=3",
                                     "model.lr_scheduler.num_warmup_steps=4")
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.model.trainable_parameters()), "a partition of the trainable"
    assert all(".router." in n for n, p in module.model.named_parameters()
               if any(p is q for q in groups["routers"]["params"]))
    lr = 1e-4  # tiny's optimizer.lr
    rates = []
    for _ in range(6):
        rates.append({name: g["lr"] for name, g in groups.items()})
        optimizer.step()
        scheduler.step()
    assert rates[0] == {"experts": 0.0, "routers": 0.0, "prompt_encoder": 0.0}
    assert abs(rates[2]["routers"] - 10 * lr * 2 / 4) < 1e-12
    assert rates[5] == pytest.approx({"experts": lr, "routers": 10 * lr, "prompt_encoder": 3 * lr}, rel=1e-12)


def test_dropped_subjects_become_router_background_and_leave_the_object_loss(compose_cfg):
    module, batch, _ = module_and_batch(compose_cfg, "model.condition_dropout=0")
    batch["subject_valid"][:, 0] = True
    _, kept = module.compute_losses(batch, torch.Generator().manual_seed(0))
    assert kept["router_prior_weight_foreground"] > 0
    for option in ("subject_dropout", "text_only_dropout"):
        module, batch, _ = module_and_batch(compose_cfg, "model.condition_dropout=0", f"model.{option}=1")
        losses, stats = module.compute_losses(batch, torch.Generator().manual_seed(0))
        assert stats["router_prior_weight_foreground"] == 0, f"{option}: a dropped subject still counts as foreground"
        assert losses["object"] == 0
        # ... but not in validation, where every condition is kept
        _, validation = module.compute_losses(batch, torch.Generator().manual_seed(0), dropout=False)
        assert validation["router_prior_weight_foreground"] > 0


def test_background_influence_term_adds_its_weighted_loss_and_trains_layers_outside_the_router_loss(compose_cfg):
    module, batch, _ = module_and_batch(compose_cfg, "model.condition_dropout=0", "model.lambda_background_influence=0.5")
    outside = [name for name in module.influence_layers if name not in module.loss_layers]
    assert outside and module.loss_layers < module.influence_layers, "every MoA layer, beyond the router loss's L"
    losses, stats = module.compute_losses(batch, torch.Generator().manual_seed(0))
    expected = (losses["masked"] + module.lambda_router * losses["router"] + module.lambda_object * losses["object"]
                + 0.5 * losses["background_influence"])
    assert losses["background_influence"] > 0
    torch.testing.assert_close(losses["loss"], expected)
    assert stats["personalized_influence_background"] > 0
    # its gradient reaches a cross-attention expert of a block the router and object losses skip
    cross_outside = next(n for n in sorted(outside) if "attn2" in n)
    expert = dict(module.model.named_parameters())
    key = next(k for k in expert if f"{cross_outside}." in k and "expert.v_proj" in k)
    gradient = torch.autograd.grad(losses["background_influence"], expert[key])[0]
    assert gradient.abs().sum() > 0, key
    no_prior_branch = ("model.lambda_background_influence=0.5", "model.net.moa_config.variant=no_moa")
    with pytest.raises(ConfigError, match=r"lambda_background_influence=0.5 .*variant=no_moa has not"):
        preflight(compose_cfg(*no_prior_branch))
    with pytest.raises(hydra.errors.InstantiationException, match=r"needs .*variant=moa, not 'no_moa'"):
        module_and_batch(compose_cfg, *no_prior_branch)


def test_min_snr_weighting_reweights_by_timestep_and_is_exact_at_infinite_gamma(compose_cfg):
    module, batch, _ = module_and_batch(compose_cfg)
    plain, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    module.snr_gamma = 1e12
    unclipped, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    module.snr_gamma = 1e-3  # below every SNR in [0, 800): every sample is down-weighted
    weighted, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(plain["masked"], unclipped["masked"], rtol=1e-5)
    assert not torch.allclose(plain["masked"], weighted["masked"], rtol=1e-3)


def test_augmentation_is_seeded_by_the_draw_and_flips_image_and_masks_together(compose_cfg):
    # At the images' own size (96), so no resizing (nearest is not mirror-symmetric) blurs the comparison.
    _, _, plain = module_and_batch(compose_cfg, "data.resolution=96")
    _, _, augmented = module_and_batch(compose_cfg, "data.resolution=96", "data.target_flip_p=1.0",
                                        "+data.augmentation._target_=moa.data.transforms.SubjectAugmentation")
    original, dataset = plain.dataset[0], augmented.dataset
    assert torch.equal(dataset[0]["subject_pixel_values"], original["subject_pixel_values"]), "plain index: no augmentation"
    first, again, other = dataset[(0, 5)], dataset[(0, 5)], dataset[(0, 6)]
    assert all(torch.equal(first[k], again[k]) for k in first), "the same draw must give the same sample"
    valid = first["subject_valid"]
    assert not torch.equal(first["subject_pixel_values"][valid], other["subject_pixel_values"][valid])
    assert not torch.equal(first["subject_pixel_values"][valid], original["subject_pixel_values"][valid])
    assert torch.allclose(first["pixel_values"], original["pixel_values"].flip(-1), atol=1e-6)
    assert torch.equal(first["subject_masks"], original["subject_masks"].flip(-1))
    assert augmented.val_dataset.augment is None, "held-out samples are never augmented"


def _trainable(module):
    return {k: v.detach().clone() for k, v in module.model.trainable_state_dict().items()}


def test_ema_is_exported_and_resumes_exactly_with_accumulation(compose_cfg, tmp_path):
    common = ("model.ema_decay=0.9", "trainer.accumulate_grad_batches=2", "callbacks=default",
              "callbacks.samples.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=2",
              "trainer.val_check_interval=1000")
    straight_cfg = compose_cfg("trainer.max_steps=4", *common, f"export_dir={tmp_path}/straight_export",
                               out=tmp_path / "straight")
    _, straight = train(straight_cfg)
    first_export = load_file(tmp_path / "straight_export" / "moa.safetensors")
    # The same command again resumes at its last step: Lightning skips on_train_start, where a resumed run's
    # moving average is loaded; the export must still be the run's average, not the initial weights.
    train(straight_cfg)
    train(compose_cfg("trainer.max_steps=2", *common, "export_dir=null", out=tmp_path / "resumed"))
    _, resumed = train(compose_cfg("trainer.max_steps=4", *common, "export_dir=null", out=tmp_path / "resumed"))
    a, b = straight["module"], resumed["module"]
    assert max((x - y).abs().max().item() for x, y in zip(a.ema.shadow_params, b.ema.shadow_params)) <= 1e-6
    raw = _trainable(a)
    assert max((raw[k] - _trainable(b)[k]).abs().max().item() for k in raw) <= 1e-6
    exported = load_file(tmp_path / "straight_export" / "moa.safetensors")
    with a.averaged_weights():
        averaged = _trainable(a)
    assert all(torch.equal(exported[k], averaged[k]) for k in exported), "the export must hold the EMA weights"
    assert all(torch.equal(exported[k], first_export[k]) for k in exported), "rerunning a finished run changed its export"
    from moa.training.checkpoints import model_from_checkpoint

    evaluated = model_from_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt").trainable_state_dict()
    assert all(torch.equal(evaluated[k], averaged[k]) for k in exported), "evaluation must see the EMA weights too"
    assert any(not torch.equal(exported[k], raw[k]) for k in exported), "EMA equal to the raw weights: no averaging"


def test_validation_on_held_out_subjects_is_logged_and_repeatable(compose_cfg, tmp_path):
    cfg = compose_cfg("trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks=none", "export_dir=null",
                      "data.val_samples=4")
    _, objects = train(cfg)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    validated = [r for r in rows if r.get("val/loss")]
    assert len(validated) == 2, "validation every 2 of 4 steps"
    module, datamodule = objects["module"], objects["datamodule"]
    assert set(datamodule.val_dataset.ids).isdisjoint(datamodule.dataset.ids)
    trainer = objects["trainer"]
    first, second = (trainer.validate(module, datamodule=datamodule, verbose=False)[0] for _ in range(2))
    assert first["val/loss"] == second["val/loss"], "the same weights must give the same validation loss"


def test_frozen_weights_in_bf16_give_the_same_losses_within_bf16_tolerance(compose_cfg):
    losses = {}
    for dtype in (None, "bf16"):
        module, batch, _ = module_and_batch(compose_cfg, f"model.frozen_dtype={dtype or 'null'}")
        frozen = [p for p in module.model.parameters() if not p.requires_grad]
        trainable = module.model.trainable_parameters()
        assert {p.dtype for p in frozen} == {torch.bfloat16 if dtype else torch.float32}
        assert {p.dtype for p in trainable} == {torch.float32}, "trained weights stay fp32"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[dtype], _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
        losses[dtype]["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    # (The object loss, a difference of two ~1/T attention means near 1e-4, is left out: its relative
    # difference is meaningless; it enters the total with weight 1e-4.)
    for name in ("masked", "router", "loss"):
        a, b = losses[None][name].item(), losses["bf16"][name].item()
        assert abs(a - b) <= 0.03 * abs(a), f"{name}: {a} (fp32 frozen) vs {b} (bf16 frozen)"


def test_face_loss_weight_weighs_the_face_pixels_of_the_masked_loss(compose_cfg):
    """With face pixels weighted w, L(w) = (E_rest + w E_face) / (A_rest + w A_face): the errors E of the
    non-face and face subject pixels, solved from L(1) and L(3), must predict L(7) (same noise)."""
    module, batch, _ = module_and_batch(compose_cfg, "model.face_loss_weight=3", "data.face_regions=true")
    valid = batch["subject_valid"][..., None, None]
    factor = 2 ** (len(module.model.vae.config.block_out_channels) - 1)
    latent_size = (batch["pixel_values"].shape[-2] // factor,) * 2
    foreground = latent_union_mask(batch["subject_masks"] * valid, latent_size)
    faces = latent_union_mask(batch["subject_face_masks"] * valid, latent_size)
    area_face = (foreground * faces).sum().item()
    area_rest = foreground.sum().item() - area_face
    assert 0 < area_face < area_rest
    losses = {}
    for weight in (1.0, 3.0, 7.0):
        module.face_loss_weight = weight
        with torch.no_grad():
            losses[weight] = module.compute_losses(batch, torch.Generator().manual_seed(0))[0]["masked"].item()
    # L(w) (A_rest + w A_face) = E_rest + w E_face, for w = 1 and 3 -> E_face, E_rest
    total_1, total_3 = losses[1.0] * (area_rest + area_face), losses[3.0] * (area_rest + 3 * area_face)
    error_face = (total_3 - total_1) / 2
    error_rest = total_1 - error_face
    predicted = (error_rest + 7 * error_face) / (area_rest + 7 * area_face)
    assert losses[3.0] != pytest.approx(losses[1.0], rel=1e-4)
    assert losses[7.0] == pytest.approx(predicted, rel=1e-4)


def test_face_loss_weight_without_face_regions_is_refused_before_training(compose_cfg, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"model.face_loss_weight=3 .* needs data.face_regions=true"):
        preflight(compose_cfg("model.face_loss_weight=3"))
    with pytest.raises(ValueError, match=r"model.face_loss_weight=0.5: .*>= 1"):
        check_ranges(compose_cfg("model.face_loss_weight=0.5"), TRAINING_RANGES)
    module, batch, _ = module_and_batch(compose_cfg, "model.face_loss_weight=3")  # preflight bypassed
    with pytest.raises(ValueError, match="set data.face_regions=true"):
        module.compute_losses(batch, torch.Generator().manual_seed(0))
    root = tmp_path / "no_faces"
    shutil.copytree(synthetic_root, root)
    for path in root.glob("*/*.json"):
        annotation = json.loads(path.read_text())
        for segment in annotation["segments"]:
            segment.pop("face_bbox", None)
        path.write_text(json.dumps(annotation))
    datamodule = hydra.utils.instantiate(compose_cfg(f"data.root={root}", "data.face_regions=true").data)
    with pytest.raises(ValueError, match=r"data.face_regions=true: none of the first \d+ samples .* face_bbox"):
        datamodule.setup()
