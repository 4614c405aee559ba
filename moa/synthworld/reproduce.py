"""SynthWorld end to end: ``python -m moa.synthworld`` (config ``conf/synthworld.yaml``).

1. the world: scenes, masks, captions and reference renders (``moa.synthworld.world``);
2. stage 1: the tiny VAE, prior and image encoder (``experiment=synth_vae``, ``synth_prior``,
   ``synth_clip``), or the committed ones (``prior=committed``);
3. stage 2: MoA and its ablations on that frozen prior (``experiment=synth_moa`` ...);
4. the judges (``moa.synthworld.judges``), trained on the world's renders;
5. measurement (``moa.synthworld.measure``): the same prompts and seeds for every variant, prior-only
   included, read by the judges; the report and figures (``moa.synthworld.report``).

Stages 2 and 3 are ``python -m moa.training experiment=<name>`` runs (the same code as ``train.py``)
in subprocesses; each experiment's config holds its own step counts and batch sizes, and the only
overrides added are paths and, at ``scale=smoke``, the scale's listed ``stage_overrides`` (every
command is logged). A finished stage is skipped and an interrupted one resumes, so re-running the
command resumes the reproduction. Writes ``results.md``, ``results.json``, ``timings.json`` and figures.
"""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from moa.checks import ConfigError, Range, check_ranges, exit_on_config_error
from moa.config import CONFIG_DIR, asset
from moa.files import write_text

log = logging.getLogger(__name__)


class Timings:
    """Wall time per stage, kept in ``timings.json`` across resumed runs (a skipped stage keeps the
    time it took when it ran)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(seconds, 1)
        write_text(self.path, json.dumps(self.seconds, indent=2) + "\n")


def run_stage(stage: str, overrides: list[str], done: Path, timings: Timings) -> None:
    """``python -m moa.training <overrides>`` unless ``done`` exists; its output goes to the stage's log."""
    if done.exists():
        log.info("stage %s: already done (%s)", stage, done)
        return
    command = [sys.executable, "-m", "moa.training", *overrides]
    log.info("stage %s: python %s", stage, " ".join(command[1:]))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not done.exists():
        raise RuntimeError(f"stage {stage} failed (exit {result.returncode}); its last output:\n{result.stderr[-3000:]}")
    timings.record(stage, time.perf_counter() - start)
    log.info("stage %s: done in %.0f s", stage, timings.seconds[stage])


def train_models(cfg: DictConfig, out: Path, world: Path, timings: Timings) -> tuple[str, str, dict[str, Path]]:
    """Stages 1 and 2; returns (prior folder, image encoder folder, variant -> exported MoA weights)."""
    cache = out / "cache"
    common = [f"paths.cache_dir={cache}", f"seed={cfg.seed}", "logger=csv", *cfg.scale.stage_overrides]
    data = f"embedded.data_root={world}"
    if cfg.prior == "train":
        run_stage("stage1_vae", [*common, data, "experiment=synth_vae", f"hydra.run.dir={out}/stage1_vae",
                                 f"export_dir={out}/vae"], out / "vae" / "model_index.json", timings)
        # The prior reads the same scenes, a share of them captioned with their people's identity.
        from moa.synthworld.world import IMAGE_SIZE, write_synthetic_ffhq

        prior_world = world.with_name("world_described")
        write_synthetic_ffhq(prior_world, num_samples=cfg.scale.world_samples, size=IMAGE_SIZE, seed=cfg.seed,
                             described_fraction=cfg.prior_described_fraction, **world_shape(cfg))
        run_stage("stage1_prior", [*common, f"embedded.data_root={prior_world}", "experiment=synth_prior",
                                   f"hydra.run.dir={out}/stage1_prior", f"base_model={out}/vae",
                                   f"export_dir={out}/prior"], out / "prior" / "model_index.json", timings)
        run_stage("stage1_clip", [*common, data, "experiment=synth_clip", f"hydra.run.dir={out}/stage1_clip",
                                  f"export_dir={out}/clip"], out / "clip" / "config.json", timings)
        prior, image_encoder = str(out / "prior"), str(out / "clip")
    else:
        prior = asset("synth-prior") if cfg.prior == "committed" else str(cfg.prior)
        image_encoder = asset("synth-clip")
    weights = {}
    for variant in cfg.variants:
        run_dir = out / variant
        run_stage(variant, [*common, data, f"experiment={variant}", f"hydra.run.dir={run_dir}", f"base_model={prior}",
                            f"image_encoder={image_encoder}"],
                  run_dir / "moa_weights" / "moa.safetensors", timings)
        weights[variant] = run_dir / "moa_weights"
    return prior, image_encoder, weights


def world_shape(cfg: DictConfig) -> dict[str, float]:
    """``write_synthetic_ffhq``'s drawing options from the config's ``world_*`` ones."""
    return {"head_scale": float(cfg.world_head_scale), "object_scale": float(cfg.world_object_scale),
            "figure_scale": float(cfg.world_figure_scale)}


def uses_committed_judges(cfg: DictConfig) -> bool:
    return cfg.judges == "committed" or (cfg.judges == "auto" and cfg.prior != "train")


def check_config(cfg: DictConfig) -> None:
    """Fail on a bad choice before any stage runs."""
    if cfg.prior not in ("train", "committed") and not (Path(str(cfg.prior)) / "model_index.json").exists():
        raise ConfigError(f"prior={cfg.prior!r}: expected 'train', 'committed' or a diffusers Stable Diffusion folder")
    if cfg.judges not in ("auto", "train", "committed"):
        raise ConfigError(f"judges={cfg.judges!r}: expected 'auto', 'train' or 'committed'")
    check_ranges(cfg, {"prior_described_fraction": Range(False, 0.0, 1.0, "a share of scenes in [0, 1]"),
                       "world_head_scale": Range(False, 0.5, 2.0, "a head size factor in (0.5, 2]", above_low=True),
                       "world_object_scale": Range(False, 0.5, 3.0, "an object size factor in (0.5, 3]",
                                                   above_low=True),
                       "world_figure_scale": Range(False, 0.5, 2.0, "a figure size factor in (0.5, 2]",
                                                   above_low=True)})
    redrawn = {f"world_{key}={value}" for key, value in world_shape(cfg).items() if value != 1.0}
    if uses_committed_judges(cfg) and redrawn:
        raise ConfigError(f"{', '.join(sorted(redrawn))} with the committed judges, which read the default world "
                          "(every world_* option 1.0): add judges=train")
    experiments = Path(CONFIG_DIR) / "experiment"
    unknown = [v for v in cfg.variants if not (experiments / f"{v}.yaml").exists()]
    if unknown:
        raise ConfigError(f"variants: {unknown} are not experiments in {experiments}")


def check_world_reuse(world: Path, asked: dict) -> None:
    """A resumed run reuses ``world`` (and every stage trained on it): refuse one written with other
    options. Worlds from before ``world.json`` existed are not checked; an option added to
    ``write_synthetic_ffhq`` after a world was written counts as its default there."""
    from moa.synthworld.world import WORLD_FILE, write_synthetic_ffhq

    if not (world / WORLD_FILE).exists():
        return
    defaults = {name: parameter.default for name, parameter in inspect.signature(write_synthetic_ffhq).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    written = defaults | json.loads((world / WORLD_FILE).read_text())
    differing = {key: (written[key], value) for key, value in asked.items() if written[key] != value}
    if differing:
        raise ConfigError(f"{world / WORLD_FILE}: this run's world was written with other options, "
                          f"(written, asked): {differing}; use another out= or delete {world.parent}")


def reproduce(cfg: DictConfig) -> dict:
    """Everything, in order; returns the results written to ``results.json``."""
    check_config(cfg)
    # Imported after the check: a mistyped option fails before torch and diffusers load.
    from moa.synthworld.judges import JUDGES_FILE, Judges, train_judges
    from moa.synthworld.measure import evaluate_variants, judge_calibration, probe_image_encoder
    from moa.synthworld.report import write_report
    from moa.synthworld.world import IMAGE_SIZE, write_synthetic_ffhq

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    start = time.perf_counter()
    world = out / "world"
    asked = {"num_samples": cfg.scale.world_samples, "seed": cfg.seed, **world_shape(cfg)}
    check_world_reuse(world, asked)
    if cfg.prior == "train":
        check_world_reuse(world.with_name("world_described"),
                          asked | {"described_fraction": cfg.prior_described_fraction})
    if not (world / "image_ids.txt").exists():
        write_synthetic_ffhq(world, num_samples=cfg.scale.world_samples, size=IMAGE_SIZE, seed=cfg.seed,
                             **world_shape(cfg))
        timings.record("world", time.perf_counter() - start)
    prior, image_encoder, weights = train_models(cfg, out, world, timings)

    def trained_judges(name: str, seed: int) -> Judges:
        folder = out / name
        if not (folder / JUDGES_FILE).exists():
            stage_start = time.perf_counter()
            train_judges(world, folder, max_steps=cfg.scale.judge_steps, seed=seed)
            timings.record(name, time.perf_counter() - stage_start)
        return Judges.load(folder)

    # Committed judges make the readings reproducible across machines (judges retrained elsewhere read
    # the same images differently); a second judge trained with another seed measures that spread.
    judges = Judges.load(asset("synth-judges")) if uses_committed_judges(cfg) else trained_judges("judges", cfg.seed)
    spread_seed = cfg.eval.spread_judge_seed
    spread_judges = None if spread_seed is None else trained_judges(f"judges_seed{spread_seed}", spread_seed)
    stage_start = time.perf_counter()
    results = evaluate_variants(cfg, out, world, prior, image_encoder, weights, judges, spread_judges)
    results["judges"] = judge_calibration(judges, world, prior)
    results["image_encoder"] = probe_image_encoder(image_encoder, world, seed=cfg.seed)
    timings.record("evaluation", time.perf_counter() - stage_start)
    timings.record("this_invocation", time.perf_counter() - start)
    write_report(out, results, timings.seconds)
    log.info("results in %s", out / "results.md")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="synthworld")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    reproduce(cfg)
