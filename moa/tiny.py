"""Tiny stand-ins for SD1.5 and CLIP ViT-L/14, built from configs and saved in their real formats.

They keep SD1.5's topology (4 down/up blocks, 2 layers per block, 16 transformer blocks = 32
attention layers) at small widths, and they are written with ``save_pretrained`` and read back with
``from_pretrained``: exactly the path that loads ``runwayml/stable-diffusion-v1-5`` and
``openai/clip-vit-large-patch14``. The tokenizer is a byte-level BPE in CLIP's format, trained on the
synthetic captions and the evaluation prompts, so every prompt tokenizes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

log = logging.getLogger(__name__)

# SD1.5's published U-Net config, used by tests that need the real shape (random weights).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
TINY_UNET_CONFIG = dict(SD15_UNET_CONFIG, sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64,
                        attention_head_dim=4, norm_num_groups=8)
TINY_TEXT_WIDTH = 64
TINY_IMAGE_SIZE = 64  # pixels of the tiny model's images (the VAE downsamples by 4 -> 16x16 latents)
# SD1.5's noise schedule.
SD15_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, steps_offset=1, prediction_type="epsilon")
TINY_VERSION = "2"  # bump when anything below changes, so cached copies are rebuilt

_BYTE_LEVEL_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_tokenizer(texts: list[str], out_dir: Path, *, vocab_size: int = 1000) -> CLIPTokenizer:
    """Train a byte-level BPE on ``texts`` and save it as CLIP's ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    # CLIP's vocabulary order: bytes, bytes + "</w>", merge results, then the two special tokens.
    base = sorted(alphabet)
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=77)
    clip.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def _tokenizer_corpus() -> list[str]:
    from moa.evaluation.protocol import load_protocol
    from moa.synthworld.world import caption_corpus

    protocol = load_protocol()
    prompts = [t.format(c=word) for t in protocol.prompts for word in ("man", "woman", "person", "kid")]
    return caption_corpus() + prompts * 5


def build_tiny_components(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny SD1.5-format pipeline (``stable-diffusion/``) and a CLIP model (``clip/``, the
    image encoder and the prompt-consistency judge) into ``out_dir``. Idempotent and atomic: an existing complete build is reused."""
    out_dir = Path(out_dir)
    marker = out_dir / "tiny_version.txt"
    if marker.exists() and marker.read_text().strip() == TINY_VERSION:
        return out_dir
    log.info("building tiny SD1.5-topology components in %s", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_tiny_components(staging, seed=seed)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_tiny_components(staging: Path, *, seed: int) -> None:
    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(_tokenizer_corpus(), staging / "tokenizer-build")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(staging / "stable-diffusion")
    # Like openai/clip-vit-large-patch14: one CLIPModel folder (text + vision + projections, tokenizer,
    # image processor) that serves as MoA's image encoder and as the prompt-consistency judge.
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=64),
        projection_dim=64,
    ))
    clip.save_pretrained(staging / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(staging / "clip")
    shutil.rmtree(staging / "tokenizer-build")
    (staging / "tiny_version.txt").write_text(TINY_VERSION + "\n")
