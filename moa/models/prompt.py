"""Multimodal prompt (paper eq. 8): subject image + subject word -> per-layer, per-timestep token."""

from __future__ import annotations

import math

import torch
from torch import nn


class SpacetimeEncoding(nn.Module):
    """Learned positional encoding ``PE(t, l)`` of diffusion timestep and transformer block.

    Fourier features of the normalised timestep and block index, then a small MLP. (The paper only
    says "learned positional encoding"; Fourier features make nearby timesteps and blocks start out
    similar, which a lookup table would not.)
    """

    def __init__(self, out_dim: int, *, num_blocks: int, num_frequencies: int = 8, hidden_dim: int = 256,
                 max_timestep: int = 1000):
        super().__init__()
        self.num_blocks, self.num_frequencies, self.max_timestep = num_blocks, num_frequencies, max_timestep
        self.mlp = nn.Sequential(nn.Linear(4 * num_frequencies, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def fourier_features(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps (batch,) -> (batch, num_blocks, 4 * num_frequencies), always in fp32.

        The frequencies are made here rather than kept as a buffer: ``pipe.to(dtype=float16)`` would
        cast a buffer, and the highest frequency (2^7 pi) times t near 1 then loses ~0.1 rad of phase
        against training."""
        t = timesteps.float()[:, None].expand(-1, self.num_blocks) / self.max_timestep
        block = torch.linspace(0.0, 1.0, self.num_blocks, device=t.device)[None].expand_as(t)
        frequencies = math.pi * 2.0 ** torch.arange(self.num_frequencies, dtype=torch.float32, device=t.device)
        angles = torch.stack([t, block], dim=-1)[..., None] * frequencies  # (b, blocks, 2, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps (batch,) -> encodings (batch, num_blocks, out_dim)."""
        return self.mlp(self.fourier_features(timesteps).to(self.mlp[0].weight.dtype))


class MultimodalPromptEncoder(nn.Module):
    """``MLP(LayerNorm(concat(f, t)) + LayerNorm(PE(t, l)))`` for each subject, block and timestep.

    Args:
        image_dim: width of the image feature ``f`` (CLIP ViT-L/14 projection: 768).
        text_dim: width of the text encoder's output (SD1.5: 768); also the output width.
        num_blocks: transformer blocks of the U-Net (SD1.5: 16).
        spacetime: ``False`` is the ``no_spacetime`` ablation (``m_bar = LayerNorm(m)``); the
            output then has a single block dimension, broadcast over blocks.
        tokens_per_subject: tokens made for each subject (the paper: 1, in place of its word). More
            give the subject more keys in the personalized cross-attention (``personalize_text``);
            the last linear layer then outputs that many tokens' widths, each normalised alone.
        patch_tokens: also make one token per image patch (not the paper: IP-Adapter-Plus's route),
            from the encoder's projected patch features by a linear layer and a LayerNorm, the same
            for every block and timestep. Pooled features carry what a subject is, not where on the
            figure it is; a patch token can give the head's queries the head's colours.
    """

    def __init__(self, *, image_dim: int, text_dim: int, num_blocks: int = 16, spacetime: bool = True,
                 hidden_dim: int | None = None, tokens_per_subject: int = 1, patch_tokens: bool = False):
        super().__init__()
        if tokens_per_subject < 1:
            raise ValueError(f"tokens_per_subject={tokens_per_subject}: expected 1 or more")
        multimodal_dim = image_dim + text_dim
        hidden_dim = hidden_dim or multimodal_dim
        self.spacetime = spacetime
        self.num_blocks = num_blocks
        self.tokens_per_subject = tokens_per_subject
        self.norm = nn.LayerNorm(multimodal_dim)
        if spacetime:
            self.positional = SpacetimeEncoding(multimodal_dim, num_blocks=num_blocks)
            self.positional_norm = nn.LayerNorm(multimodal_dim)
        self.mlp = nn.Sequential(
            nn.Linear(multimodal_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, tokens_per_subject * text_dim),
            nn.LayerNorm(text_dim),
        )
        self.patch_tokens = patch_tokens
        if patch_tokens:
            self.patch_projection = nn.Sequential(nn.Linear(image_dim, text_dim), nn.LayerNorm(text_dim))

    def forward(self, image_features: torch.Tensor, word_embeddings: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """image_features (batch, subjects, image_dim), or with patch tokens (batch, subjects,
        1 + patches, image_dim) (pooled first, ``encode_images(patches=True)``); word_embeddings (batch,
        subjects, text_dim), timesteps (batch,) -> subject tokens (batch, blocks, subjects,
        tokens_per_subject [+ patches], text_dim), blocks = 1 without spacetime conditioning."""
        if self.patch_tokens != (image_features.dim() == 4):
            raise ValueError(f"image features of shape {tuple(image_features.shape)}: this prompt encoder expects "
                             f"{'pooled and patch' if self.patch_tokens else 'pooled'} features "
                             f"(patch_tokens={self.patch_tokens})")
        patches = None
        if self.patch_tokens:
            image_features, patches = image_features[:, :, 0], image_features[:, :, 1:]
        multimodal = self.norm(torch.cat([image_features, word_embeddings], dim=-1))[:, None]
        if self.spacetime:
            positional = self.positional_norm(self.positional(timesteps))  # (b, blocks, dim)
            multimodal = multimodal + positional[:, :, None]
        # The final LayerNorm acts per token; kept as mlp[3] so that 1-token weights keep their names.
        tokens = self.mlp[3](self.mlp[:3](multimodal).unflatten(-1, (self.tokens_per_subject, -1)))
        if patches is None:
            return tokens
        patch_tokens = self.patch_projection(patches.to(tokens.dtype))[:, None].expand(-1, tokens.shape[1], -1, -1, -1)
        return torch.cat([tokens, patch_tokens], dim=3)


def personalize_text(text_embeddings: torch.Tensor, subject_tokens: torch.Tensor, token_index: torch.Tensor,
                     subject_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Put each subject's first token in place of its word's embedding and append the others.

    text_embeddings (batch, tokens, dim); subject_tokens (batch, blocks, subjects, per_subject, dim);
    token_index, subject_valid (batch, subjects) -> the personalized condition (batch, blocks,
    tokens + subjects * (per_subject - 1), dim) and, with more than one token per subject, which of
    its keys to attend to (batch, tokens + subjects * (per_subject - 1)), else None. Extra tokens are
    appended because cross-attention keys have no positions: where one sits does not matter, and the
    prompt's own tokens are never overwritten. Padded subjects (``subject_valid`` False) change
    nothing: their word keeps its embedding and their extra keys are masked out (zeros under the mask).
    Written with one-hot products instead of indexing so it needs no host sync and batches over blocks.
    """
    one_hot = nn.functional.one_hot(token_index, text_embeddings.shape[1]).to(text_embeddings.dtype)
    one_hot = one_hot * subject_valid[..., None].to(text_embeddings.dtype)  # (b, subjects, tokens)
    keep = (1.0 - one_hot.sum(dim=1)).clamp(min=0.0)  # (b, tokens)
    placed = torch.einsum("bst,blsd->bltd", one_hot, subject_tokens[:, :, :, 0])
    personalized = text_embeddings[:, None] * keep[:, None, :, None] + placed
    extra_per_subject = subject_tokens.shape[3] - 1
    if extra_per_subject == 0:
        return personalized, None
    extra = subject_tokens[:, :, :, 1:] * subject_valid[:, None, :, None, None].to(subject_tokens.dtype)
    key_mask = torch.cat([torch.ones_like(keep, dtype=torch.bool),
                          subject_valid.repeat_interleave(extra_per_subject, dim=1)], dim=1)
    return torch.cat([personalized, extra.flatten(2, 3)], dim=2), key_mask
