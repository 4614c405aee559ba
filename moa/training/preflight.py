"""A training run's preflight: types, ranges and paths checked in well under a second, before any model loads."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moa.checks import ConfigError, Range, check_ranges
from moa.data.stores import SHARD_INDEX, SPLIT_FILES
from moa.pretrained import check_pretrained_path

# option -> (integer?, lowest, highest, what is expected); options absent from a config are skipped.
TRAINING_RANGES = {
    "trainer.max_steps": Range(True, 1, None, "a positive number of optimizer steps"),
    "trainer.accumulate_grad_batches": Range(True, 1, None, "a positive number of micro-batches per step"),
    "trainer.log_every_n_steps": Range(True, 1, None, "a positive number of steps"),
    "trainer.gradient_clip_val": Range(False, 0, None, "a non-negative norm (0: no clipping)", nullable=True),
    "data.batch_size": Range(True, 1, None, "a positive per-device batch size"),
    "data.num_workers": Range(True, 0, None, "0 or more loader worker processes"),
    "data.resolution": Range(True, 8, None, "a positive multiple of 8 pixels (the VAE downsamples 8x)", multiple_of=8),
    "data.max_subjects": Range(True, 1, 4, "1..4 subjects per image"),
    "data.max_corrupt_fraction": Range(False, 0, 1, "a fraction in [0, 1]"),
    "model.optimizer.lr": Range(False, 0, None, "a positive learning rate", above_low=True),
    "model.image_encoder_lr": Range(False, 0, None, "a positive learning rate, or null", above_low=True, nullable=True),
    "model.lambda_router": Range(False, 0, None, "a non-negative loss weight (paper: 1e-4)"),
    "model.router_loss_foreground_weight": Range(False, 0, None, "a non-negative weight (paper: 0)"),
    "model.lambda_background_influence": Range(False, 0, None, "a non-negative loss weight (paper: 0, no such term)"),
    "model.lambda_object": Range(False, 0, None, "a non-negative loss weight (paper: 1e-4)"),
    "model.face_loss_weight": Range(False, 1, None, "a weight >= 1 for face pixels (paper: 1)"),
    "model.condition_dropout": Range(False, 0, 1, "a probability in [0, 1]"),
    "model.max_timestep": Range(True, 1, None, "a positive number of diffusion timesteps"),
    "model.net.image_encoder_trainable_layers": Range(True, 0, None, "0 or more trainable image-encoder layers"),
    "model.net.tokens_per_subject": Range(True, 1, None, "1 or more subject tokens (paper: 1)"),
}


def check_data_root(cfg: DictConfig) -> None:
    """The data folder holds what the reader will ask for first (split list or shard index)."""
    root = Path(str(cfg.data.root))
    data_format = cfg.data.get("data_format", "folder")
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r}: no such folder (expected FastComposer's FFHQ-wild layout)")
    if data_format == "shards":
        if not (root / SHARD_INDEX).exists():
            raise ConfigError(f"data.root={str(root)!r}: no {SHARD_INDEX} (data.data_format=shards expects the "
                              "output of python -m moa.data.shards)")
        return
    if data_format != "folder":
        raise ConfigError(f"data.data_format={data_format!r}: expected 'folder' or 'shards'")
    split = cfg.data.get("split", "train")
    if split not in SPLIT_FILES:
        raise ConfigError(f"data.split={split!r}: expected one of {sorted(SPLIT_FILES)}")
    if not (root / SPLIT_FILES[split]).exists():
        raise ConfigError(f"data.root={str(root)!r}: {SPLIT_FILES[split]} not found (data.split={split} needs it; "
                          "is this an FFHQ-wild folder?)")


def preflight(cfg: DictConfig) -> None:
    """Check the run's types, ranges and input paths in a fraction of a second. Paths the embedded
    default builds itself are skipped (they appear on first use)."""
    embedded = cfg.get("embedded") or {}
    built = {str(embedded.get("data_root", "")), str(embedded.get("components_dir", ""))}

    def is_built(path: str) -> bool:
        return any(b and path.startswith(b) for b in built)

    check_ranges(cfg, TRAINING_RANGES)
    frozen_dtype = OmegaConf.select(cfg, "model.frozen_dtype")
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    if frozen_dtype is not None and not precision.endswith("-mixed"):
        raise ConfigError(f"model.frozen_dtype={frozen_dtype}: needs a mixed trainer.precision (bf16-mixed or "
                          f"16-mixed, whose autocast mixes the dtypes), not {precision}")
    influence = OmegaConf.select(cfg, "model.lambda_background_influence", default=0.0)
    variant = OmegaConf.select(cfg, "model.net.moa_config.variant", default="moa")
    if influence and variant != "moa":
        raise ConfigError(f"model.lambda_background_influence={influence} measures the personalized expert against "
                          f"the prior branch, which model.net.moa_config.variant={variant} has not (expected moa)")
    face_loss_weight = OmegaConf.select(cfg, "model.face_loss_weight", default=1.0)
    if face_loss_weight != 1 and not OmegaConf.select(cfg, "data.face_regions", default=False):
        raise ConfigError(f"model.face_loss_weight={face_loss_weight} weighs face pixels, which needs "
                          "data.face_regions=true (person segments with face_bbox)")
    if "root" in cfg.data and not is_built(str(cfg.data.root)):
        check_data_root(cfg)
    for option, expect in (("base_model", "a diffusers Stable Diffusion folder or a single-file checkpoint"),
                           ("image_encoder", "a CLIP vision model folder")):
        value = str(cfg[option])
        if not is_built(value):
            try:
                check_pretrained_path(value, option=option, expect=expect)
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(str(error)) from None
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "", "null", "last") and not Path(str(ckpt_path)).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such checkpoint file (or 'last' to resume the run "
                          "directory's newest, null to start fresh)")
