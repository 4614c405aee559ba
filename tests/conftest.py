import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from moa.synthworld.world import write_synthetic_ffhq
from moa.tiny import build_tiny_components

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny SD1.5-topology components, saved with save_pretrained (built once per test session)."""
    return build_tiny_components(tmp_path_factory.mktemp("tiny") / "components")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small generated data set in the FFHQ-wild on-disk format."""
    return write_synthetic_ffhq(tmp_path_factory.mktemp("data") / "ffhq", num_samples=24, size=96, seed=3)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    logging.getLogger("moa").setLevel(logging.INFO)


def compose_train(tmp_path, tiny_dir, synthetic_root, overrides=(), config_name="train", ffhq_data=True):
    """Compose a config as `python train.py` would, pointed at the session's tiny assets.
    ``ffhq_data=False`` for experiments whose data group is not the FFHQ-wild DataModule."""
    data = ["data.resolution=64"] if ffhq_data else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=[
            f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "logger=csv",
            f"base_model={tiny_dir}/stable-diffusion", f"image_encoder={tiny_dir}/clip",
            f"data.root={synthetic_root}", "data.num_workers=0", *data, "data.batch_size=2",
            "trainer=cpu", "embedded=null", *overrides,
        ])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.root_dir = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path, tiny_dir, synthetic_root):
    def _compose(*overrides, config_name="train", out=None, ffhq_data=True):
        return compose_train(out or tmp_path, tiny_dir, synthetic_root, overrides, config_name, ffhq_data)
    return _compose
