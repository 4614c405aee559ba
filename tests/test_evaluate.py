"""evaluate.py end to end on a checkpoint trained by train.py (tiny, CPU, a protocol subsample)."""

import json
import os

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from moa.evaluation.evaluate import evaluate
from moa.training.run import train
from tests.conftest import CONF_DIR


def test_evaluate_on_a_trained_checkpoint_and_resume(compose_cfg, tmp_path):
    train(compose_cfg("trainer.max_steps=2", "~callbacks.samples", out=tmp_path / "train"))
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"ckpt_path={checkpoint}", "subsample.subjects=2", "subsample.prompts=1", "seeds=[0,1]",
            "num_inference_steps=3", "metrics.identity.allow_random_weights=true", "device=cpu", "wandb.enabled=false",
            f"paths.root_dir={tmp_path}",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(cfg)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    expected = {"identity", "no_face_rate", "prompt_consistency", "clip_score", "diversity", "prior_diversity",
                "vs_prior_psnr_outside", "vs_prior_mae_outside", "swap_psnr_outside", "swap_mae_outside"}
    assert expected <= set(results["metrics"]) | set(results["infinite"])
    assert results["identity_is_test_only"] and "RANDOM" in results["identity_weights"]
    assert "RANDOM" in (tmp_path / "eval" / "results.md").read_text()
    assert results["images"] == 2 * 4 * 2
    images = sorted((tmp_path / "eval" / "images").rglob("*_seed*.png"))
    assert len([p for p in images if "region" not in p.name]) == 2 * 4 * 2 + 4 * 2  # subjects + prior-only ("man")
    assert len(list((tmp_path / "eval" / "grids").glob("*.png"))) == 2 * 2  # a grid and a router overlay each
    # resumable: a second run generates nothing again
    stamps = {p: os.stat(p).st_mtime_ns for p in images}
    assert evaluate(cfg) == metrics
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    # A damaged image (outside interference: our writes are atomic) and a kill's leftover temp file:
    # the image is generated again, the leftover removed, the numbers unchanged.
    damaged = images[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    leftover = damaged.with_name(f".{damaged.stem}.partial-999.png")
    leftover.write_bytes(b"half")
    assert evaluate(cfg) == metrics
    assert os.stat(damaged).st_mtime_ns != stamps[damaged] and not leftover.exists()


def test_evaluation_config_errors_come_before_any_model_loads(tmp_path):
    import time

    import pytest

    from moa.checks import ConfigError

    (tmp_path / "x.ckpt").write_bytes(b"")

    def config(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[
                f"ckpt_path={tmp_path / 'x.ckpt'}", "metrics.identity.allow_random_weights=true", "wandb.enabled=false",
                f"paths.root_dir={tmp_path}", *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "eval")
        return cfg

    cases = [(["metrics.identity.weights=/no/such/vggface2.pt"], "metrics.identity.weights='/no/such/vggface2.pt'"),
             (["metrics.identity.allow_random_weights=false"], "metrics.identity.weights is not set"),
             (["num_inference_steps=0"], "num_inference_steps=0: expected a positive"),
             (["seeds=[0,a]"], "seeds="),
             (["ckpt_path=null"], "set exactly one of ckpt_path"),
             (["subject_guidance_scale=-1"], "subject_guidance_scale=-1: expected a non-negative"),
             (["guidance_scale=1", "subject_guidance_scale=2"],
              "subject_guidance_scale=2: needs classifier-free guidance, guidance_scale > 1")]
    for overrides, expected in cases:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            evaluate(config(*overrides))
        assert time.monotonic() - start < 2
    with pytest.raises(ValueError, match=r"x.ckpt'?: unreadable checkpoint \(EOFError"):
        evaluate(config())  # a valid config: the empty checkpoint is named, not a bare EOFError
