"""Where the Hydra configs live, and the OmegaConf resolvers they use (registered once, on import)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# conf/ beside the package: the entry points run from a checkout (README: pip install -e).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def wandb_offline() -> bool:
    """wandb runs offline unless credentials are configured (``WANDB_API_KEY`` or ``~/.netrc``)."""
    if os.environ.get("WANDB_MODE") == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text())


def precision(gpu_precision: str = "bf16-mixed") -> str:
    """``gpu_precision`` where CUDA is available, full fp32 on CPUs (bf16 autocast there is slow)."""
    import torch

    return gpu_precision if torch.cuda.is_available() else "32-true"


def device() -> str:
    """``cuda`` where available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def asset(name: str) -> str:
    """Path of a file or folder shipped in ``moa/assets`` (works from a checkout and from a wheel)."""
    from importlib import resources

    return str(resources.files("moa") / "assets" / name)


for _name, _fn in {"moa_wandb_offline": wandb_offline, "moa_precision": precision, "moa_device": device,
                   "moa_asset": asset}.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
