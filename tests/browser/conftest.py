import socket
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.conftest import CONF_DIR


@pytest.fixture(scope="session")
def chromium():
    """The system Chromium (installed with apt on first use, as the SLURM tests install SLURM)."""
    script = Path(__file__).with_name("chromium.sh")
    return subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True, timeout=600).stdout.strip()


@pytest.fixture(scope="session")
def demo_url(tiny_dir, tmp_path_factory):
    """The demo served in this process on a free port, on MoA weights exported from the tiny components."""
    from moa.demo import launch
    from moa.models.model import MoAModel

    weights = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip").export_moa(
        tmp_path_factory.mktemp("demo") / "moa_weights")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="demo", overrides=[
            f"moa_weights={weights}", f"base_model={tiny_dir / 'stable-diffusion'}", f"image_encoder={tiny_dir / 'clip'}",
            f"port={port}", "device=cpu", "num_inference_steps=3", "layers_shown=4"])
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path_factory.getbasetemp())
    page = launch(cfg, block=False)
    yield f"http://127.0.0.1:{port}"
    page.close()
