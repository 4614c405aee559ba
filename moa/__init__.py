"""MoA (Mixture-of-Attention) for personalized text-to-image generation."""

from moa.attention import MoAAttnProcessor, Router
from moa.inputs import MoAInputs
from moa.prompt import MultimodalPromptEncoder
from moa.unet import MoAConfig, install_moa, load_moa_state_dict, moa_state_dict

__all__ = [
    "MoAAttnProcessor",
    "MoAConfig",
    "MoAInputs",
    "MultimodalPromptEncoder",
    "Router",
    "install_moa",
    "load_moa_state_dict",
    "moa_state_dict",
]
