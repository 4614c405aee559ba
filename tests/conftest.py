import logging

import pytest
import torch

from moa.tiny import build_tiny_components


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny SD1.5-topology components, saved with save_pretrained (built once per test session)."""
    return build_tiny_components(tmp_path_factory.mktemp("tiny") / "components")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    logging.getLogger("moa").setLevel(logging.INFO)
