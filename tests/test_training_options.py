"""Speed/memory options change nothing but speed and memory."""

import hydra
import pytest
import torch


def _loss_and_grads(compose_cfg, *overrides):
    cfg = compose_cfg(*overrides)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset, batch_size=2)))
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
