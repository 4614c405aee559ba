"""The MoA layer's promises: the prior branch is the original model, exactly."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from moa import MoAConfig, MoAInputs, install_moa, load_moa_state_dict, moa_state_dict
from moa.models.unet import MoALayoutError, attention_layers, loss_layer_names, moa_processors
from moa.tiny import SD15_UNET_CONFIG


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10, 700])[:batch]
    return latents, timesteps, text


@pytest.fixture
def unet(tiny_dir):
    return UNet2DConditionModel.from_pretrained(tiny_dir / "stable-diffusion", subfolder="unet").eval()


def _randomize(modules):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0.0, 0.5)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_no_subject_and_pers_equal_prior_gives_original_unet_for_any_router(unet):
    latents, t, text = _inputs(unet)
    with torch.no_grad():
        reference = unet(latents, t, text).sample
    install_moa(unet)
    _randomize(p.router for p in moa_processors(unet).values())
    # No subject injected: the personalized condition is the plain text, for every block.
    moa = MoAInputs(personalized_condition=text[:, None])
    with torch.no_grad():
        out = unet(latents, t, text, cross_attention_kwargs={"moa": moa}).sample
    diff = _max_diff(out, reference)
    print(f"prior preservation (no subject, pers == prior, random routers): max abs diff {diff:.3e}")
    assert diff <= 1e-5
    # The routers really are random (else this test could not fail): a changed expert changes the output.
    _randomize(p.expert for p in moa_processors(unet).values())
    with torch.no_grad():
        changed = unet(latents, t, text, cross_attention_kwargs={"moa": MoAInputs(personalized_condition=text[:, None])}).sample
    assert _max_diff(changed, reference) > 1e-3


def test_router_forced_to_prior_gives_original_unet_for_any_personalized_weights(unet):
    latents, t, text = _inputs(unet)
    with torch.no_grad():
        reference = unet(latents, t, text).sample
    install_moa(unet)
    processors = moa_processors(unet).values()
    _randomize(p.expert for p in processors)
    with torch.no_grad():
        for p in processors:
            last = p.router.net[-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor([60.0, -60.0]))  # softmax -> (1, 0) to float precision
    subject_condition = torch.randn(2, 16, *text.shape[1:])
    with torch.no_grad():
        out = unet(latents, t, text, cross_attention_kwargs={"moa": MoAInputs(personalized_condition=subject_condition)}).sample
        prior_only = unet(latents, t, text, cross_attention_kwargs={"moa": MoAInputs(prior_only=True)}).sample
    diff = _max_diff(out, reference)
    print(f"prior preservation (router forced to prior, random personalized experts): max abs diff {diff:.3e}")
    assert diff <= 1e-5
    assert _max_diff(prior_only, reference) == 0.0


def test_sd15_shape_unet_gets_32_processors_and_11_loss_blocks():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    trainable = install_moa(unet)
    processors = moa_processors(unet)
    assert len(processors) == 32
    assert sum(p.is_cross_attention for p in processors.values()) == 16
    loss_layers = loss_layer_names(unet, MoAConfig())
    blocks = sorted({processors[name].block_index for name in loss_layers})
    assert blocks == list(range(2, 13))  # skip the first 2 and the last 3 of 16
    n_trainable = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in unet.parameters()) - n_trainable
    print(f"SD1.5-shape U-Net with MoA: {n_trainable / 1e6:.2f}M trainable, {n_frozen / 1e6:.2f}M frozen")
    assert all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".processor." not in n)


def test_moa_state_dict_round_trip_and_layout_mismatch(unet, tiny_dir):
    install_moa(unet)
    _randomize(moa_processors(unet).values())
    saved = {k: v.clone() for k, v in moa_state_dict(unet).items()}
    assert all(".processor." not in k for k in saved)
    fresh = UNet2DConditionModel.from_pretrained(tiny_dir / "stable-diffusion", subfolder="unet")
    install_moa(fresh)
    load_moa_state_dict(fresh, saved)
    for key, value in moa_state_dict(fresh).items():
        assert torch.equal(value, saved[key])
    with pytest.raises(MoALayoutError, match="missing"):
        load_moa_state_dict(fresh, {k: v for k, v in saved.items() if "up_blocks" not in k})
    mlp = UNet2DConditionModel.from_pretrained(tiny_dir / "stable-diffusion", subfolder="unet")
    install_moa(mlp, MoAConfig(router_hidden_dim=8))
    with pytest.raises(MoALayoutError, match="unexpected|another shape"):
        load_moa_state_dict(mlp, saved)


def test_layout_mismatch_is_a_clear_error_before_any_forward():
    small = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
    )
    with pytest.raises(MoALayoutError, match="transformer blocks"):
        install_moa(small)
    assert attention_layers(small, MoAConfig(num_transformer_blocks=4, loss_skip_first_blocks=0, loss_skip_last_blocks=0))


def test_no_moa_variant_is_one_attention_equal_to_the_prior_at_initialisation(unet):
    latents, t, text = _inputs(unet)
    with torch.no_grad():
        reference = unet(latents, t, text).sample
    install_moa(unet, MoAConfig(variant="no_moa"))
    assert all(p.router is None for p in moa_processors(unet).values())
    with torch.no_grad():
        out = unet(latents, t, text, cross_attention_kwargs={"moa": MoAInputs(personalized_condition=text[:, None])}).sample
    assert _max_diff(out, reference) <= 1e-5
    _randomize(p.expert for p in moa_processors(unet).values())
    with torch.no_grad():
        changed = unet(latents, t, text, cross_attention_kwargs={"moa": MoAInputs(personalized_condition=text[:, None])}).sample
    assert _max_diff(changed, reference) > 1e-3  # no prior branch: the trained attention alone answers


def test_spacetime_conditioning_varies_with_block_and_timestep_and_the_ablation_does_not():
    from moa.models.prompt import MultimodalPromptEncoder

    features, words = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    encoder = MultimodalPromptEncoder(image_dim=8, text_dim=6, num_blocks=16)
    tokens = encoder(features, words, torch.tensor([10, 700]))
    assert tokens.shape == (2, 16, 3, 1, 6)
    assert not torch.allclose(tokens[:, 0], tokens[:, 5])
    assert not torch.allclose(encoder(features, words, torch.tensor([10, 10])), encoder(features, words, torch.tensor([900, 900])))
    ablation = MultimodalPromptEncoder(image_dim=8, text_dim=6, num_blocks=16, spacetime=False)
    static = ablation(features, words, torch.tensor([10, 700]))
    assert static.shape == (2, 1, 3, 1, 6)
    assert torch.equal(static, ablation(features, words, torch.tensor([999, 1])))


def test_personalize_text_replaces_only_valid_subject_tokens():
    from moa.models.prompt import personalize_text

    text = torch.randn(1, 5, 4)
    subject_tokens = torch.randn(1, 2, 2, 1, 4)  # (batch, blocks, subjects, tokens per subject, dim)
    out, key_mask = personalize_text(text, subject_tokens, torch.tensor([[1, 3]]), torch.tensor([[True, False]]))
    assert out.shape == (1, 2, 5, 4) and key_mask is None
    assert torch.equal(out[0, 1, 1], subject_tokens[0, 1, 0, 0])
    for untouched in (0, 2, 3, 4):  # token 3 belongs to a padded subject
        assert torch.equal(out[0, 0, untouched], text[0, untouched])


def test_extra_subject_tokens_are_appended_and_a_padded_subjects_are_masked_out():
    from moa.models.prompt import MultimodalPromptEncoder, personalize_text

    encoder = MultimodalPromptEncoder(image_dim=8, text_dim=4, num_blocks=16, tokens_per_subject=3)
    text = torch.randn(2, 5, 4)
    subject_tokens = encoder(torch.randn(2, 2, 8), torch.randn(2, 2, 4), torch.tensor([10, 700]))
    assert subject_tokens.shape == (2, 16, 2, 3, 4)
    assert not torch.allclose(subject_tokens[..., 0, :], subject_tokens[..., 1, :])  # not one token repeated
    valid = torch.tensor([[True, False], [True, True]])
    out, key_mask = personalize_text(text, subject_tokens, torch.tensor([[1, 3], [2, 1]]), valid)
    assert out.shape == (2, 16, 5 + 2 * 2, 4)
    assert key_mask.tolist() == [[True] * 7 + [False] * 2, [True] * 9]
    block = 7
    # Sample 0: subject 0's first token at its word, its two others appended; subject 1 is padding.
    assert torch.equal(out[0, block, 1], subject_tokens[0, block, 0, 0])
    assert torch.equal(out[0, block, 5:7], subject_tokens[0, block, 0, 1:])
    for untouched in (0, 2, 3, 4):
        assert torch.equal(out[0, block, untouched], text[0, untouched])
    # Sample 1: both subjects given, in slot order.
    assert torch.equal(out[1, block, 2], subject_tokens[1, block, 0, 0])
    assert torch.equal(out[1, block, 1], subject_tokens[1, block, 1, 0])
    assert torch.equal(out[1, block, 5:9], subject_tokens[1, block, :, 1:].flatten(0, 1))


def test_patch_tokens_follow_the_subject_tokens_shared_over_blocks_and_masked_when_padded():
    from moa.models.prompt import MultimodalPromptEncoder, personalize_text

    torch.manual_seed(0)
    pooled_only = MultimodalPromptEncoder(image_dim=8, text_dim=4, num_blocks=16, tokens_per_subject=2)
    encoder = MultimodalPromptEncoder(image_dim=8, text_dim=4, num_blocks=16, tokens_per_subject=2, patch_tokens=True)
    encoder.load_state_dict(pooled_only.state_dict(), strict=False)  # same pooled path, new patch projection
    features, words, timesteps = torch.randn(2, 2, 1 + 4, 8), torch.randn(2, 2, 4), torch.tensor([10, 700])
    tokens = encoder(features, words, timesteps)
    assert tokens.shape == (2, 16, 2, 2 + 4, 4)
    assert torch.allclose(tokens[..., :2, :], pooled_only(features[:, :, 0], words, timesteps))
    by_hand = torch.nn.functional.layer_norm(features[:, :, 1:] @ encoder.patch_projection[0].weight.T
                                             + encoder.patch_projection[0].bias, (4,))
    for block in (0, 9, 15):  # one token per patch, the same at every block
        assert torch.allclose(tokens[:, block, :, 2:], by_hand, atol=1e-6)
    out, key_mask = personalize_text(torch.randn(2, 5, 4), tokens, torch.tensor([[1, 3], [2, 1]]),
                                     torch.tensor([[True, False], [True, True]]))
    assert out.shape == (2, 16, 5 + 2 * 5, 4)
    assert key_mask.tolist() == [[True] * 10 + [False] * 5, [True] * 15]
    assert torch.equal(out[0, 3, 5:10], tokens[0, 3, 0, 1:])
    with pytest.raises(ValueError, match=r"expects pooled and patch features \(patch_tokens=True\)"):
        encoder(features[:, :, 0], words, timesteps)


def test_masked_extra_tokens_change_nothing_in_the_moa_layer():
    """A padded subject's extra keys are out of the personalized attention: the layer's output is the
    same as without them, whatever they hold."""
    from diffusers.models.attention_processor import Attention

    from moa.models.attention import MoAAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    processor = MoAAttnProcessor(attn, name="attn2", block_index=0, is_cross_attention=True)
    with torch.no_grad():
        for p in processor.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hidden, text = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    condition = torch.randn(2, 1, 5, 8)
    without = processor(attn, hidden, text, moa=MoAInputs(personalized_condition=condition))
    padded = torch.cat([condition, torch.randn(2, 1, 3, 8)], dim=2)
    mask = torch.tensor([[True] * 5 + [False] * 3] * 2)
    masked = processor(attn, hidden, text, moa=MoAInputs(personalized_condition=padded, personalized_key_mask=mask))
    assert torch.allclose(masked, without, atol=1e-6)
    unmasked = processor(attn, hidden, text, moa=MoAInputs(personalized_condition=padded))
    assert not torch.allclose(unmasked, without, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spacetime_phases_survive_casting_the_encoder_to_half_precision(dtype):
    """Inference casts the prompt encoder (``pipe.to(dtype=...)``); the timestep phases must stay
    those of fp32 training (a cast frequency table was off by ~0.1 rad near t = 1)."""
    from moa.models.prompt import SpacetimeEncoding

    encoding = SpacetimeEncoding(8, num_blocks=16)
    timesteps = torch.tensor([1, 500, 999])
    reference = encoding.fourier_features(timesteps)
    assert torch.equal(encoding.to(dtype).fourier_features(timesteps), reference)
    assert encoding(timesteps).dtype == dtype


class _LoRALinear(torch.nn.Module):
    """A host projection wrapped as LoRA loaders wrap it (not a plain ``nn.Linear``)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.3)

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T

    def effective_weight(self):
        return self.base.weight + self.up @ self.down


def _written_out_attention(x, context, q, k, v, out, heads):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection; and the head-mean probabilities."""
    def weight(layer):
        return layer.effective_weight() if isinstance(layer, _LoRALinear) else layer.weight

    batch, d = x.shape[0], weight(q).shape[0] // heads
    Q, K, V = (t @ weight(layer).T for t, layer in ((x, q), (context, k), (context, v)))
    Q, K, V = (t.view(batch, -1, heads, d).transpose(1, 2) for t in (Q, K, V))
    probs = torch.softmax(Q @ K.transpose(-1, -2) / d**0.5, dim=-1)
    merged = (probs @ V).transpose(1, 2).reshape(batch, -1, heads * d)
    return merged @ out.weight.T + out.bias, probs.mean(dim=1)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("first_layer", [False, True], ids=["inner", "first"])
@pytest.mark.parametrize("lora_host", [False, True], ids=["plain", "lora"])
def test_moa_layer_equals_eq_6_7_written_out_in_value_and_gradient(cross, first_layer, lora_host):
    """Whatever kernels the processor fuses (one matmul for shared inputs, one SDPA over both experts'
    heads), it must be eq. 6-7: R0 * Attn_prior(Z, C_prior) + R1 * Attn_pers(Z, C_pers), with the object
    loss's maps those of the personalized expert. ``first_layer``: the input needs no gradient."""
    from diffusers.models.attention_processor import Attention

    from moa.models.attention import MoAAttnProcessor

    torch.manual_seed(0)
    dim, text_dim, heads, batch, pixels, tokens = 16, 12, 4, 2, 9, 7
    host = Attention(dim, cross_attention_dim=text_dim if cross else None, heads=heads, dim_head=dim // heads,
                     out_bias=True).double()
    processor = MoAAttnProcessor(host, name="layer", block_index=1, is_cross_attention=cross).double()
    _randomize([processor])
    host.requires_grad_(False)
    if lora_host:  # a trainable LoRA on the frozen prior's projections
        host.to_q, host.to_k = _LoRALinear(host.to_q), _LoRALinear(host.to_k)
    host.set_processor(processor)
    hidden = torch.randn(batch, pixels, dim, dtype=torch.float64, requires_grad=not first_layer)
    text = torch.randn(batch, tokens, text_dim, dtype=torch.float64)
    condition = torch.randn(batch, 3, tokens, text_dim, dtype=torch.float64, requires_grad=True)
    token_index = torch.tensor([[1, 4], [2, 5]])
    moa = MoAInputs(personalized_condition=condition, subject_token_index=token_index,
                    record_attention_layers=frozenset({"layer"}) if cross else frozenset(),
                    record_router_layers=frozenset({"layer"}), record_influence_layers=frozenset({"layer"}))
    out = host(hidden, encoder_hidden_states=text if cross else None, moa=moa)

    expert = processor.expert
    prior, _ = _written_out_attention(hidden, text if cross else hidden, host.to_q, host.to_k, host.to_v,
                                      host.to_out[0], heads)
    personalized, probs = _written_out_attention(hidden, condition[:, 1] if cross else hidden, expert.q_proj,
                                                 expert.k_proj, expert.v_proj, expert.out_proj, heads)
    router = torch.softmax(processor.router.net(hidden), dim=-1)
    expected = router[..., :1] * prior + router[..., 1:] * personalized
    assert torch.allclose(out, expected, atol=1e-10)
    assert torch.allclose(moa.router_maps["layer"], router[..., 0], atol=1e-12)
    # the personalized expert's whole effect on the output, relative to the prior output's mean energy
    influence = (router[..., 1:] * (personalized - prior)).pow(2).mean(-1) / prior.detach().pow(2).mean(dim=(1, 2))[:, None]
    assert torch.allclose(moa.influence_maps["layer"], influence, atol=1e-12)
    with torch.no_grad():  # sampling: the projections sharing an input are fused into one matmul
        sampled = host(hidden, encoder_hidden_states=text if cross else None,
                       moa=MoAInputs(personalized_condition=condition))
    assert torch.allclose(sampled, expected, atol=1e-10)
    probes = [torch.randn_like(out), torch.randn_like(influence)]
    outputs, references = [out, moa.influence_maps["layer"]], [expected, influence]
    if cross:
        expected_maps = torch.gather(probs, 2, token_index[:, None, :].expand(-1, pixels, -1))
        assert torch.allclose(moa.subject_attention["layer"], expected_maps, atol=1e-12)
        probes.append(torch.randn_like(expected_maps))
        outputs.append(moa.subject_attention["layer"])
        references.append(expected_maps)
    inputs = list(processor.parameters()) + [condition] + ([] if first_layer else [hidden])
    if lora_host:
        inputs += [host.to_q.down, host.to_q.up, host.to_k.down, host.to_k.up]

    def grads(tensors):
        loss = sum((t * probe).sum() for t, probe in zip(tensors, probes))
        return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)

    for got, want in zip(grads(outputs), grads(references)):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            assert torch.allclose(got, want, atol=1e-9)


@pytest.mark.slow
def test_moa_unet_compiles_to_one_graph(unet):
    """``model.compile_unet`` (and CUDA graphs for sampling) need the MoA processors to trace without
    graph breaks, also with the map losses recording and gradients on."""
    install_moa(unet)
    latents, t, text = _inputs(unet)
    layers = loss_layer_names(unet, MoAConfig())
    moa = MoAInputs(personalized_condition=torch.randn(2, 16, *text.shape[1:]), subject_token_index=torch.tensor([[1], [2]]),
                    record_router_layers=layers, record_attention_layers=layers)
    unet.train()
    explanation = torch._dynamo.explain(unet)(latents, t, text, cross_attention_kwargs={"moa": moa})
    print(f"graphs {explanation.graph_count}, breaks {explanation.graph_break_count}: {explanation.break_reasons}")
    assert explanation.graph_break_count == 0
