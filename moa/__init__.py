"""MoA (Mixture-of-Attention) for personalized text-to-image generation.

Names are imported on first use, so that light modules (config resolvers, the CLI's error paths)
do not pay for torch and diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "MoAAttnProcessor": "moa.models.attention",
    "Router": "moa.models.attention",
    "MoAInputs": "moa.models.inputs",
    "MultimodalPromptEncoder": "moa.models.prompt",
    "MoAConfig": "moa.models.unet",
    "install_moa": "moa.models.unet",
    "load_moa_state_dict": "moa.models.unet",
    "moa_state_dict": "moa.models.unet",
    "MoAModel": "moa.models.model",
    "MoAPipeline": "moa.inference.pipeline",
    "Subject": "moa.inference.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moa' has no attribute {name!r}")
