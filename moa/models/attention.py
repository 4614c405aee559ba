"""The MoA layer (paper eq. 6-7) as a diffusers attention processor.

The host ``diffusers.models.attention_processor.Attention`` module keeps its own projections: they
*are* the frozen prior expert. The processor owns only the new weights: a personalized expert (a copy
of the host projections, trainable) and a per-pixel router. This is the split that
``IPAdapterAttnProcessor2_0`` uses, and it means LoRAs loaded onto the host projections land in the
prior branch only.

Without MoA inputs (or with ``prior_only``) a layer runs diffusers' stock ``AttnProcessor2_0``: bit for
bit the original model. With both experts it runs them together where it can (one matmul for the
projections that share an input, one SDPA call over the prior's and the expert's heads stacked), which
is the same math in fewer, larger kernels; ``tests/test_moa_layer.py`` checks it against eq. 6-7 written
out, in value and gradient.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from moa.models.inputs import MoAInputs


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim), a view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)."""
    return x.transpose(1, 2).flatten(2)


def project(x: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
    """``cat([layer(x) for layer in layers], -1)``, as one matmul when every layer is a plain
    ``nn.Linear``. Wrapped layers (a LoRA on the host's projections) are called as modules, so that
    whatever they add is kept. Not fused when some weights train and others do not: the backward of
    the fused matmul would compute the frozen weights' gradients too."""
    if not all(type(layer) is nn.Linear for layer in layers) or (
            torch.is_grad_enabled() and len({layer.weight.requires_grad for layer in layers}) > 1):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])
    return F.linear(x, weight, bias)


def subject_attention_maps(query: torch.Tensor, key: torch.Tensor, token_index: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities at the subject tokens, averaged over heads.

    query (batch, heads, pixels, head_dim), key (batch, heads, tokens, head_dim), token_index
    (batch, subjects), an additive ``attention_mask`` as SDPA takes it -> (batch, pixels, subjects).
    SDPA does not expose its probabilities; the object loss needs them, so they are recomputed beside it. Over the ~77 text keys that is cheap next to the
    attention output, and the output itself keeps the fused kernel.
    """
    scores = (query @ key.transpose(-1, -2)) * (1.0 / math.sqrt(query.shape[-1]))
    if attention_mask is not None:
        scores = scores + attention_mask
    mean_probs = scores.softmax(dim=-1).mean(dim=1)  # (batch, pixels, tokens)
    return torch.gather(mean_probs, 2, token_index[:, None, :].expand(-1, mean_probs.shape[1], -1))


def personalized_influence(personalized_weight: torch.Tensor, personalized: torch.Tensor,
                           prior: torch.Tensor) -> torch.Tensor:
    """How much the personalized expert changes a MoA layer's output, per pixel, (batch, pixels).

    The layer's output is ``prior + R1 * (personalized - prior)``, so ``R1 * (personalized - prior)``
    is the whole of the personalized expert's effect: a router weight alone is not (a pixel may be
    routed to an expert that agrees with the prior). Its energy per channel is divided by the mean
    energy of the prior's output over the image (held constant in backward), so layers of different
    widths and scales count alike. personalized_weight (batch, pixels, 1); outputs (batch, pixels, dim).
    """
    dtype = torch.promote_types(prior.dtype, torch.float32)  # half-precision squares lose the small changes
    change = (personalized_weight * (personalized - prior)).to(dtype).pow(2).mean(dim=-1)
    scale = prior.detach().to(dtype).pow(2).mean(dim=(1, 2)).clamp(min=1e-12)
    return change / scale[:, None]


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
        given, the attention probabilities at those tokens, averaged over heads (batch, pixels, subjects).
        """
        query = split_heads(self.q_proj(hidden_states), self.heads)
        key = split_heads(self.k_proj(context), self.heads)
        value = split_heads(self.v_proj(context), self.heads)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        maps = None if token_index is None else subject_attention_maps(query, key, token_index, attention_mask)
        return self.out_proj(merge_heads(out)), maps


def _is_plain_attention(host: Attention) -> bool:
    """Whether ``AttnProcessor2_0`` on ``host`` is just project, attend, project (true of every attention
    layer in SD1.5's transformer blocks), so the two experts may share kernels."""
    return (host.spatial_norm is None and host.group_norm is None and host.norm_cross is None
            and getattr(host, "norm_q", None) is None and getattr(host, "norm_k", None) is None
            and not host.residual_connection and host.rescale_output_factor == 1.0)


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
        self._plain_host = _is_plain_attention(host)

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

        context = moa.condition_for_block(self.block_index) if self.is_cross_attention else hidden_states
        token_index = moa.subject_token_index if self.is_cross_attention and self.name in moa.record_attention_layers else None
        key_mask = moa.personalized_key_mask if self.is_cross_attention else None
        if self.use_prior_branch and self._can_stack(hidden_states, encoder_hidden_states, context, attention_mask,
                                                     key_mask):
            prior, personalized, maps = self._both_experts(attn, hidden_states, encoder_hidden_states, context,
                                                           token_index)
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
                mask = mask.view(hidden_states.shape[0], attn.heads, -1, mask.shape[-1])
            if key_mask is not None:  # (batch, tokens) -> an additive (batch, 1, 1, tokens) bias
                key_bias = torch.zeros(key_mask.shape, dtype=hidden_states.dtype,
                                       device=hidden_states.device).masked_fill(~key_mask, -torch.inf)[:, None, None]
                mask = key_bias if mask is None else mask + key_bias
            personalized, maps = self.expert(hidden_states, context, mask, token_index)
            prior = None
            if self.use_prior_branch:
                prior = self._prior(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if maps is not None:
            moa.subject_attention[self.name] = maps
        if not self.use_prior_branch:
            return personalized
        weights = self.router(hidden_states)
        if self.name in moa.record_router_layers:
            moa.router_maps[self.name] = weights[..., 0]
        if self.name in moa.record_influence_layers:
            moa.influence_maps[self.name] = personalized_influence(weights[..., 1:], personalized, prior)
        return weights[..., :1] * prior + weights[..., 1:] * personalized

    def _can_stack(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   context: torch.Tensor, attention_mask: torch.Tensor | None, key_mask: torch.Tensor | None) -> bool:
        """Whether both experts can run as one attention over stacked heads. Not with a mask (the host's or
        the personalized expert's key mask) or a host
        that does more than project-attend-project, nor for cross-attention contexts of different
        lengths. Nor in a self-attention layer whose input needs no gradient (the U-Net's first) while
        training: stacked, the backward would also run through the frozen prior's heads, which
        separately need none (46 GFLOP of an SD1.5 step)."""
        if attention_mask is not None or key_mask is not None or not self._plain_host or hidden_states.ndim != 3:
            return False
        if self.is_cross_attention:
            return encoder_hidden_states is not None and encoder_hidden_states.shape[1] == context.shape[1]
        return not (torch.is_grad_enabled() and not hidden_states.requires_grad)

    def _both_experts(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                      context: torch.Tensor, token_index: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prior and personalized outputs (batch, pixels, dim) from one SDPA over 2 x heads, and the
        personalized expert's subject maps when ``token_index`` is given."""
        heads, expert = attn.heads, self.expert
        if self.is_cross_attention:
            query = project(hidden_states, [attn.to_q, expert.q_proj])
            key = torch.cat([split_heads(attn.to_k(encoder_hidden_states), heads),
                             split_heads(expert.k_proj(context), heads)], dim=1)
            value = torch.cat([split_heads(attn.to_v(encoder_hidden_states), heads),
                               split_heads(expert.v_proj(context), heads)], dim=1)
            query = split_heads(query, 2 * heads)
        else:
            qkv = project(hidden_states, [attn.to_q, expert.q_proj, attn.to_k, expert.k_proj, attn.to_v, expert.v_proj])
            query, key, value = (split_heads(x, 2 * heads) for x in qkv.chunk(3, dim=-1))
        out = merge_heads(F.scaled_dot_product_attention(query, key, value))  # (batch, pixels, 2 * inner)
        prior_heads, expert_heads = out.chunk(2, dim=-1)
        prior = attn.to_out[1](attn.to_out[0](prior_heads))  # to_out[1]: the host's dropout
        maps = None
        if token_index is not None:
            maps = subject_attention_maps(query[:, heads:], key[:, heads:], token_index)
        return prior, expert.out_proj(expert_heads), maps
