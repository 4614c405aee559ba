"""Speed/memory options change nothing but speed and memory."""

import hydra
import pytest
import torch

from tests.helpers import module_and_batch


def _loss_and_grads(compose_cfg, *overrides):
    module, batch, _ = module_and_batch(compose_cfg, *overrides)
    with torch.no_grad():  # move the experts away from the prior so every gradient is non-trivial
        for p in module.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return losses["loss"].detach(), grads


@pytest.mark.parametrize("option", ["model.gradient_checkpointing=true", "model.channels_last=true"])
def test_option_gives_the_same_loss_and_gradients(compose_cfg, option):
    loss, grads = _loss_and_grads(compose_cfg)
    loss_opt, grads_opt = _loss_and_grads(compose_cfg, option)
    assert torch.allclose(loss, loss_opt, atol=1e-6)
    worst = max((grads[k] - grads_opt[k]).abs().max().item() for k in grads)
    assert worst <= 1e-5, f"{option}: max gradient difference {worst:.2e}"


@pytest.mark.slow
def test_compiled_unet_gives_the_same_loss_and_gradients(compose_cfg):
    loss, grads = _loss_and_grads(compose_cfg)
    loss_opt, grads_opt = _loss_and_grads(compose_cfg, "model.compile_unet=true")
    assert torch.allclose(loss, loss_opt, atol=1e-5)
    worst = max((grads[k] - grads_opt[k]).abs().max().item() for k in grads)
    assert worst <= 1e-4, f"compile: max gradient difference {worst:.2e}"


def test_image_encoder_trainable_layers_get_gradients_their_own_lr_and_travel_with_the_moa_weights(compose_cfg, tmp_path):
    from moa.models.model import MoAModel

    cfg = compose_cfg("model.net.image_encoder_trainable_layers=1", "model.image_encoder_lr=3e-6")
    module = hydra.utils.instantiate(cfg.model)
    model = module.model
    encoder = model.image_encoder_trainable_state_dict()
    last = len(model.image_encoder.vision_model.encoder.layers) - 1
    assert encoder and all(k.startswith((f"vision_model.encoder.layers.{last}.", "vision_model.post_layernorm.",
                                         "visual_projection.")) for k in encoder)
    assert not any(p.requires_grad for p in model.image_encoder.vision_model.embeddings.parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    lr = cfg.model.optimizer.lr
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"experts": lr, "routers": lr, "prompt_encoder": lr,
                                                             "image_encoder": 3e-6}
    assert {id(p) for p in groups["image_encoder"]["params"]} == {id(p) for p in encoder.values()}

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset, batch_size=2)))
    batch["subject_valid"][:] = True  # every subject slot feeds the prompt, so the encoder's output matters
    torch.manual_seed(0)
    with torch.no_grad():  # experts away from the prior: the subject token then changes the prediction
        for p in model.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.values())

    with torch.no_grad():
        for p in encoder.values():
            p.add_(0.5)
    exported = model.export_moa(tmp_path / "moa")
    reloaded = MoAModel.from_pretrained(cfg.base_model, cfg.image_encoder, moa_weights=exported)
    assert reloaded.image_encoder_trainable_layers == 1
    for name, value in reloaded.image_encoder_trainable_state_dict().items():
        assert torch.equal(value, encoder[name]), name
    with pytest.raises(hydra.errors.InstantiationException, match="image_encoder_trainable_layers=99: expected 0..2"):
        hydra.utils.instantiate(compose_cfg("model.net.image_encoder_trainable_layers=99").model)


def _backward_with_every_subject(module, batch):
    """Backpropagate the training loss with every subject slot feeding the prompt and the experts moved
    away from the prior, so that the subject tokens change the prediction."""
    batch["subject_valid"][:] = True
    with torch.no_grad():
        for p in module.model.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
    losses["loss"].backward()


def test_extra_subject_tokens_reach_the_loss_and_travel_with_the_moa_weights(compose_cfg, tmp_path):
    from moa.models.model import MoAModel

    module, batch, _ = module_and_batch(compose_cfg, "model.net.tokens_per_subject=3")
    model = module.model
    _backward_with_every_subject(module, batch)
    text_dim = model.text_encoder.config.hidden_size
    out_layer = model.prompt_encoder.mlp[2]
    assert out_layer.weight.shape[0] == 3 * text_dim
    for token in range(3):  # each token's rows of the last layer get a gradient: each is a key the loss sees
        assert out_layer.weight.grad[token * text_dim:(token + 1) * text_dim].abs().sum() > 0, token

    exported = model.export_moa(tmp_path / "moa")
    reloaded = MoAModel.from_pretrained(compose_cfg().base_model, compose_cfg().image_encoder, moa_weights=exported)
    assert reloaded.prompt_encoder.tokens_per_subject == 3
    assert torch.equal(reloaded.prompt_encoder.mlp[2].weight, out_layer.weight)
    from moa.checks import check_ranges
    from moa.training.preflight import TRAINING_RANGES
    with pytest.raises(ValueError, match="model.net.tokens_per_subject=0: expected 1 or more"):
        check_ranges(compose_cfg("model.net.tokens_per_subject=0"), TRAINING_RANGES)


def test_patch_tokens_reach_the_loss_and_travel_with_the_moa_weights_and_checkpoints(compose_cfg, tmp_path):
    from omegaconf import OmegaConf

    from moa.models.model import MoAModel, encode_images
    from moa.training.checkpoints import model_from_checkpoint

    cfg = compose_cfg("model.net.patch_tokens=true")
    module, batch, _ = module_and_batch(compose_cfg, "model.net.patch_tokens=true")
    model = module.model
    pixels = batch["subject_pixel_values"]
    features = model.encode_subjects(pixels)
    vision = model.image_encoder.config
    assert features.shape == (*pixels.shape[:2], 1 + (vision.image_size // vision.patch_size) ** 2, vision.projection_dim)
    assert torch.equal(features[:, :, 0], encode_images(model.image_encoder, pixels))  # pooled first, as without
    padded = model.encode_subjects(pixels, torch.tensor([0]))  # only slot 0 holds a subject
    assert torch.allclose(padded.flatten(0, 1)[0], features.flatten(0, 1)[0], atol=1e-6)
    assert not padded.flatten(0, 1)[1:].any()

    _backward_with_every_subject(module, batch)
    projection = model.prompt_encoder.patch_projection[0].weight
    assert projection.grad is not None and projection.grad.abs().sum() > 0

    exported = model.export_moa(tmp_path / "moa")
    reloaded = MoAModel.from_pretrained(cfg.base_model, cfg.image_encoder, moa_weights=exported)
    assert reloaded.prompt_encoder.patch_tokens
    assert torch.equal(reloaded.prompt_encoder.patch_projection[0].weight, projection)
    checkpoint = {"hyper_parameters": {"run_config": OmegaConf.to_container(cfg, resolve=True)},
                  "state_dict": {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    restored = model_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(restored.prompt_encoder.patch_projection[0].weight, projection)


def test_frozen_image_encoder_gets_no_gradient_and_stays_out_of_the_moa_weights(compose_cfg):
    module = hydra.utils.instantiate(compose_cfg().model)
    assert not module.model.image_encoder_trainable_state_dict()
    assert not any(k.startswith("image_encoder.") for k in module.model.trainable_state_dict())
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["experts", "routers", "prompt_encoder"]


def test_micro_batches_of_one_accumulated_step_draw_different_noise(compose_cfg):
    """Under gradient accumulation the global step stays put for several batches; each micro-batch
    must still draw its own timesteps and noise."""
    import pytorch_lightning as pl

    cfg = compose_cfg()
    module = hydra.utils.instantiate(cfg.model)
    calls = []

    class RecordUNetInputs(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.model.unet.register_forward_pre_hook(
                lambda unet, args: calls.append((args[0].detach().clone(), args[1].detach().clone())))

    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[RecordUNetInputs()])
    trainer.fit(module, datamodule=hydra.utils.instantiate(cfg.data))
    assert trainer.global_step == 1 and len(calls) == 2
    (noisy_a, timesteps_a), (noisy_b, timesteps_b) = calls
    assert not torch.equal(timesteps_a, timesteps_b)
    assert not torch.allclose(noisy_a, noisy_b)


def test_image_encoder_skips_padding_slots_with_the_same_loss_and_gradients(compose_cfg):
    """The DataModule's ``on_before_batch_transfer`` indexes the real subject slots; the image encoder then
    runs on those alone, and nothing downstream may notice (padding slots feed no token)."""
    results = []
    for skip in (False, True):
        module, batch, datamodule = module_and_batch(compose_cfg, "model.net.image_encoder_trainable_layers=1")
        batch["subject_valid"][:] = False
        batch["subject_valid"][0, :2] = batch["subject_valid"][1, 0] = True
        with torch.no_grad():  # experts away from the prior: the subject tokens then change the prediction
            for p in module.model.unet.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
        if skip:
            batch = datamodule.on_before_batch_transfer(batch, 0)
        seen = []
        module.model.image_encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]),
                                                             with_kwargs=True)
        losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
        losses["loss"].backward()
        results.append((seen, losses["loss"].detach(),
                        {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}))
    (seen_all, loss_all, grads_all), (seen_real, loss_real, grads_real) = results
    assert seen_all == [batch["subject_valid"].numel()] and seen_real == [3]
    assert torch.allclose(loss_all, loss_real, atol=1e-6)
    assert any(k.startswith("model.image_encoder.") and grads_all[k].abs().sum() > 0 for k in grads_all)
    worst = max((grads_all[k] - grads_real[k]).abs().max().item() for k in grads_all)
    assert worst <= 1e-5, f"max gradient difference {worst:.2e}"


def test_cached_latents_give_the_same_loss_and_gradients_and_travel_in_shards(compose_cfg, tiny_dir, synthetic_root,
                                                                               tmp_path):
    """``moa.data.latents`` stores the VAE's distribution; training from it draws the same latents."""
    import shutil

    from moa.data.latents import cache_latents
    from moa.data.shards import pack_shards

    root = tmp_path / "ffhq"
    shutil.copytree(synthetic_root, root)
    base = str(tiny_dir / "stable-diffusion")
    with pytest.raises(hydra.errors.InstantiationException, match="no latent_cache.json; cache them first"):
        hydra.utils.instantiate(compose_cfg(f"data.root={root}", "data.cached_latents=true").data)
    cache_latents(root, base_model=base, resolution=64, batch_size=5)

    results = []
    for overrides in ([f"data.root={root}"], [f"data.root={root}", "data.cached_latents=true"]):
        module, batch, _ = module_and_batch(compose_cfg, *overrides)
        assert ("latent_moments" in batch) == ("data.cached_latents=true" in overrides)
        with torch.no_grad():  # experts away from the prior: every gradient is non-trivial
            for p in module.model.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
        losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(0))
        losses["loss"].backward()
        results.append((losses["loss"].detach(), {n: p.grad.clone() for n, p in module.named_parameters()
                                                  if p.requires_grad}))
    (loss, grads), (loss_cached, grads_cached) = results
    assert torch.allclose(loss, loss_cached, atol=1e-6)
    worst = max((grads[k] - grads_cached[k]).abs().max().item() for k in grads)
    assert worst <= 1e-5, f"max gradient difference {worst:.2e}"

    shards = pack_shards(root, tmp_path / "shards", samples_per_shard=10)
    _, shard_batch, _ = module_and_batch(compose_cfg, f"data.root={shards}", "data.data_format=shards",
                                         "data.cached_latents=true")
    _, folder_batch, _ = module_and_batch(compose_cfg, f"data.root={root}", "data.cached_latents=true")
    assert torch.equal(shard_batch["latent_moments"], folder_batch["latent_moments"])

    for overrides, message in ((["data.target_flip_p=0.5"], "a cached latent cannot be flipped"),
                               (["data.resolution=32"], "latents of resolution 64 .* needs resolution 32")):
        with pytest.raises(hydra.errors.InstantiationException, match=message):
            hydra.utils.instantiate(compose_cfg(f"data.root={root}", "data.cached_latents=true", *overrides).data)
