"""Where the parts of a pretrained model live: path checks that name the option, and single-file bases.

Imported by data, models and the entry points alike, so it needs nothing beyond the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_SINGLE_FILE_CONFIG = "runwayml/stable-diffusion-v1-5"


def check_pretrained_path(path: str | os.PathLike, *, option: str, expect: str) -> None:
    """Fail fast, naming the config option, when a model path does not exist.

    A bare hub id (``org/name``) that is not a local folder is left to ``from_pretrained``.
    """
    text = str(path)
    if Path(text).expanduser().exists():
        return
    parts = text.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not text.endswith(".safetensors")
    if not is_hub_id:
        raise FileNotFoundError(f"{option}={text!r}: no such path (expected {expect})")


def is_single_file(base_model: str | os.PathLike) -> bool:
    return str(base_model).endswith(SINGLE_FILE_SUFFIXES)


def tokenizer_source(base_model: str | os.PathLike, base_model_config: str | None = None) -> str:
    """Where the base model's tokenizer lives (a single-file checkpoint carries none)."""
    if is_single_file(base_model):
        return base_model_config or DEFAULT_SINGLE_FILE_CONFIG
    return str(base_model)
