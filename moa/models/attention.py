"""The MoA layer (paper eq. 6-7) as a diffusers attention processor.

The host ``diffusers.models.attention_processor.Attention`` module keeps its own projections: they
*are* the frozen prior expert, run by diffusers' stock ``AttnProcessor2_0`` so that the prior path
is bit-for-bit the original model. The processor owns only the new weights: a personalized expert
(a copy of the host projections, trainable) and a per-pixel router. This is the split that
``IPAdapterAttnProcessor2_0`` uses, and it means LoRAs loaded onto the host projections land in the
prior branch only.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from moa.models.inputs import MoAInputs


class Router(nn.Module):
    """Per-pixel soft choice between the prior (index 0) and personalized (index 1) experts.

    ``f_l`` of eq. 6: a linear layer, or an MLP when ``hidden_dim`` is set. The last layer starts at
    zero so a new router splits 50/50; with personalized == prior that is still the original model.
    """

    def __init__(self, dim: int, *, hidden_dim: int | None = None):
        super().__init__()
        if hidden_dim:
            self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2))
        else:
            self.net = nn.Sequential(nn.Linear(dim, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, pixels, dim) -> expert weights (batch, pixels, 2), summing to 1 per pixel."""
        return self.net(hidden_states).softmax(dim=-1)


class AttentionExpert(nn.Module):
    """q/k/v/out projections of one attention expert, copied from a host ``Attention``.

    The names differ from diffusers' ``to_q``/``to_k``/... on purpose: LoRA loaders that target those
    names must never touch the personalized expert.
    """

    def __init__(self, host: Attention):
        super().__init__()
        self.heads = host.heads
        self.q_proj = copy.deepcopy(host.to_q)
        self.k_proj = copy.deepcopy(host.to_k)
        self.v_proj = copy.deepcopy(host.to_v)
        self.out_proj = copy.deepcopy(host.to_out[0])
        for parameter in self.parameters():
            parameter.requires_grad_(True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of ``hidden_states`` (batch, pixels, dim) over ``context``
        (batch, tokens, context_dim).

        Returns the output (batch, pixels, dim) and, only when ``token_index`` (batch, subjects) is
        given, the attention probabilities at those tokens, averaged over heads
        (batch, pixels, subjects). Without ``token_index`` the fused SDPA kernel is used.
        """
        batch = hidden_states.shape[0]
        query = self.q_proj(hidden_states)
        key = self.k_proj(context)
        value = self.v_proj(context)
        head_dim = key.shape[-1] // self.heads
        query, key, value = (
            x.view(batch, -1, self.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        subject_probs = None
        if token_index is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            # The object loss needs the softmax maps, which SDPA does not expose: compute them here,
            # and only in the layers that ask for them.
            scores = (query @ key.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            out = probs @ value
            mean_probs = probs.mean(dim=1)  # (batch, pixels, tokens)
            subject_probs = torch.gather(
                mean_probs, 2, token_index[:, None, :].expand(-1, mean_probs.shape[1], -1)
            )
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim)
        return self.out_proj(out), subject_probs


class MoAAttnProcessor(nn.Module):
    """Mixture-of-Attention for one U-Net attention layer (self ``attn1`` or cross ``attn2``).

    ``out = R0 * Attn_prior(Z, C_prior) + R1 * Attn_pers(Z, C_pers)`` with ``R = Router(Z)``.
    Self-attention: both experts attend over ``Z``. Cross-attention: the prior sees the text
    embedding, the personalized expert sees the multimodal condition for this layer and timestep
    (``MoAInputs.personalized_condition``).

    With ``use_prior_branch=False`` (the ``no_moa`` ablation, FastComposer-style) there is no router
    and the trained expert alone answers whenever MoA inputs are given.

    Called without ``moa`` inputs (or with ``moa.prior_only``) it is exactly the host layer.
    """

    def __init__(
        self,
        host: Attention,
        *,
        name: str,
        block_index: int,
        is_cross_attention: bool,
        use_prior_branch: bool = True,
        router_hidden_dim: int | None = None,
    ):
        super().__init__()
        self.name = name
        self.block_index = block_index
        self.is_cross_attention = is_cross_attention
        self.use_prior_branch = use_prior_branch
        self.expert = AttentionExpert(host)
        self.router = Router(host.query_dim, hidden_dim=router_hidden_dim) if use_prior_branch else None
        self._prior = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        moa: MoAInputs | None = None,
    ) -> torch.Tensor:
        if moa is None or moa.prior_only:
            return self._prior(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        if self.is_cross_attention:
            context = moa.condition_for_block(self.block_index)
        else:
            context = hidden_states
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
            mask = mask.view(hidden_states.shape[0], attn.heads, -1, mask.shape[-1])
        wants_maps = self.is_cross_attention and self.name in moa.record_attention_layers
        personalized, subject_probs = self.expert(
            hidden_states, context, mask, moa.subject_token_index if wants_maps else None
        )
        if subject_probs is not None:
            moa.subject_attention[self.name] = subject_probs
        if not self.use_prior_branch:
            return personalized

        prior = self._prior(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        weights = self.router(hidden_states)
        if self.name in moa.record_router_layers:
            moa.router_maps[self.name] = weights[..., 0]
        return weights[..., :1] * prior + weights[..., 1:] * personalized
