"""MoA (Mixture-of-Attention) for personalized text-to-image generation.

Names are imported on first use, so that light modules (config resolvers, the CLI's error paths)
do not pay for torch and diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "MoAAttnProcessor": "moa.attention",
    "Router": "moa.attention",
    "MoAInputs": "moa.inputs",
    "MultimodalPromptEncoder": "moa.prompt",
    "MoAConfig": "moa.unet",
    "install_moa": "moa.unet",
    "load_moa_state_dict": "moa.unet",
    "moa_state_dict": "moa.unet",
    "MoAModel": "moa.model",
    "MoAPipeline": "moa.pipeline",
    "Subject": "moa.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moa' has no attribute {name!r}")
