"""Training end to end on the tiny components: runs, resumes exactly, exports what it trained."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moa.models.model import MoAModel
from moa.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def _trainable(module):
    return {k: v.detach().clone() for k, v in module.model.trainable_state_dict().items()}


def test_fast_dev_run_on_tiny(compose_cfg):
    cfg = compose_cfg("+trainer.fast_dev_run=true", "callbacks=none", "export_dir=null")
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"train/masked", "train/router", "train/object",
            "train/router_prior_weight_foreground", "train/router_prior_weight_background"} <= set(metrics)


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_get_gradients(compose_cfg):
    import hydra

    cfg = compose_cfg()
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset, batch_size=2)))
    frozen_before = {k: v.clone() for k, v in module.state_dict().items()
                     if k not in module._trainable_keys()}
    optimizer = module.configure_optimizers()["optimizer"]
    trainable = dict(module.named_parameters())
    # At initialisation personalized == prior, so routers outside the loss layers get an exactly zero
    # gradient (d out / d R is prior - personalized). From the second step on, everything must learn.
    for step in range(2):
        optimizer.zero_grad()
        losses, _ = module.compute_losses(batch, torch.Generator().manual_seed(step))
        losses["loss"].backward()
        assert all(trainable[k].grad is not None for k in module._trainable_keys())
        optimizer.step()
    no_grad = [k for k in module._trainable_keys() if not trainable[k].grad.abs().sum() > 0]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
    changed = [k for k, v in module.state_dict().items() if k in frozen_before and not torch.equal(v, frozen_before[k])]
    assert not changed
    frozen_kinds = {k.split(".")[1] for k in frozen_before}
    assert {"vae", "text_encoder", "image_encoder", "unet"} <= frozen_kinds


def test_resume_is_exact(compose_cfg, tmp_path):
    common = ("callbacks=default", "callbacks.samples.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=3",
              "export_dir=null")
    _, straight = train(compose_cfg("trainer.max_steps=6", *common, out=tmp_path / "straight"))
    train(compose_cfg("trainer.max_steps=3", *common, out=tmp_path / "resumed"))
    _, resumed = train(compose_cfg("trainer.max_steps=6", *common, out=tmp_path / "resumed"))
    assert resumed["trainer"].global_step == 6
    a, b = _trainable(straight["module"]), _trainable(resumed["module"])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume: max abs difference of trainable weights after 6 steps = {diff:.2e}")
    assert diff <= 1e-6
    # and the weights did move, so equality means something
    fresh = compose_cfg("trainer.max_steps=1", *common, out=tmp_path / "one")
    _, one = train(fresh)
    assert max((a[k] - _trainable(one["module"])[k]).abs().max().item() for k in a) > 1e-6
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("model.") and ("processor" in k or "prompt_encoder" in k) for k in checkpoint["state_dict"])


def test_export_reproduces_the_trained_module(compose_cfg, tmp_path, tiny_dir):
    cfg = compose_cfg("trainer.max_steps=2", "callbacks=none", f"export_dir={tmp_path}/export")
    _, objects = train(cfg)
    trained = objects["module"].model.eval()
    loaded = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip",
                                      moa_weights=tmp_path / "export").eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    ids = trained.tokenizer("a man holding a red ball", padding="max_length", max_length=77, return_tensors="pt").input_ids
    pixels = torch.randn(1, 1, 3, 32, 32, generator=g)
    t = torch.tensor([500])
    outs = []
    for model in (trained, loaded):
        with torch.no_grad():
            text = model.encode_text(ids)
            moa = model.moa_inputs(text, timesteps=t, subject_features=model.encode_subjects(pixels),
                                   subject_token_index=torch.tensor([[2]]), subject_valid=torch.tensor([[True]]))
            outs.append(model.unet(latents, t, text, cross_attention_kwargs={"moa": moa}).sample)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


@pytest.mark.parametrize("override, expected", [
    ("experiment=does_not_exist", "experiment"),
    ("data.root=/no/such/folder", "data.root='/no/such/folder': no such folder"),
    ("data.root={tmp}", "image_ids_train.txt not found"),
    ("base_model=/no/such/model", "base_model='/no/such/model': no such path"),
    ("base_model=/no/such/model.safetensors", "base_model="),
    ("trainer.max_steps=abc", "trainer.max_steps='abc': expected a positive number"),
    ("data.batch_size=-1", "data.batch_size=-1: expected a positive"),
    ("data.resolution=100", "data.resolution=100: expected a positive multiple of 8"),
    ("model.lambda_router=-1e-4", "model.lambda_router=-0.0001: expected a non-negative"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0: expected a positive learning rate"),
    ("model.condition_dropout=1.5", "model.condition_dropout=1.5: expected a probability"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path='/no/such.ckpt': no such checkpoint file"),
    ("model.frozen_dtype=bf16", "model.frozen_dtype=bf16: needs a mixed trainer.precision"),
])
def test_bad_config_fails_fast_with_one_line_naming_the_option(override, expected, tmp_path, tiny_dir):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), override.format(tmp=tmp_path), f"hydra.run.dir={tmp_path}",
         f"paths.cache_dir={tmp_path}/c", "logger=csv", f"embedded.components_dir={tiny_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    elapsed = time.monotonic() - start
    output = result.stderr + result.stdout
    assert result.returncode != 0
    assert expected in output
    assert "Traceback" not in output, output
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_initial_weights_do_not_depend_on_whether_embedded_assets_were_built(compose_cfg, tmp_path):
    cache = tmp_path / "cache"
    embedded = ("+embedded._target_=moa.embedded.ensure_embedded_assets", f"+embedded.components_dir={cache}/tiny", f"+embedded.data_root={cache}/data", "+embedded.num_samples=12",
                "+embedded.image_size=64", f"base_model={cache}/tiny/stable-diffusion", f"image_encoder={cache}/tiny/clip",
                f"data.root={cache}/data", "trainer.max_steps=1", "callbacks=none")
    _, first = train(compose_cfg(*embedded, f"export_dir={tmp_path}/a", out=tmp_path / "a"))  # builds the assets
    _, second = train(compose_cfg(*embedded, f"export_dir={tmp_path}/b", out=tmp_path / "b"))  # reuses them
    a, b = _trainable(first["module"]), _trainable(second["module"])
    assert all(torch.equal(a[k], b[k]) for k in a)
