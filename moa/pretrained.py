"""Where the parts of a pretrained model live: path checks that name the option, and single-file bases.

Imported by data, models and the entry points alike, so it needs nothing beyond the standard library
at import time (diffusers only inside the single-file loader).
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


def load_single_file_pipeline(base_model: str | os.PathLike, base_model_config: str | None = None):
    """A single-file SD1.5-family checkpoint (e.g. AbsoluteReality) as a diffusers pipeline, its component
    configs and tokenizer from ``base_model_config`` (default: ``runwayml/stable-diffusion-v1-5``)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(base_model), config=base_model_config or DEFAULT_SINGLE_FILE_CONFIG,
                                                    safety_checker=None, requires_safety_checker=False)


def tokenizer_source(base_model: str | os.PathLike, base_model_config: str | None = None) -> str:
    """Where the base model's tokenizer lives (a single-file checkpoint carries none)."""
    if is_single_file(base_model):
        return base_model_config or DEFAULT_SINGLE_FILE_CONFIG
    return str(base_model)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE: one printable unicode character per byte value, in CLIP's vocabulary
    order: the bytes that are printable characters themselves first, then the others, shifted to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (plain and word-final) + 48894 merges + 2 special tokens


def clip_tokenizer_files(bpe_vocab_gz: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of OpenAI CLIP's tokenizer (what ``CLIPTokenizer`` reads)
    from the BPE merge list CLIP ships, ``bpe_simple_vocab_16e6.txt.gz`` (also inside the open-clip-torch
    wheel), so the real tokenizer can be built offline. Token order is CLIP's: the byte symbols, the same
    with ``</w>``, one token per merge, then ``<|startoftext|>``, ``<|endoftext|>``."""
    import gzip
    import json

    lines = gzip.open(bpe_vocab_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1: CLIP_VOCAB_SIZE - 512 - 2 + 1]]
    symbols = _byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_vocab_gz}: {len(vocab)} tokens, expected CLIP's {CLIP_VOCAB_SIZE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out
