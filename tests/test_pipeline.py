"""MoAPipeline and the paper's applications on tiny components."""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from moa.data.subjects import SubjectBindingError
from moa.evaluation.protocol import load_protocol
from moa.inference.applications import (
    consistent_characters,
    ddim_invert,
    morph,
    real_image_subject_swap,
    subject_swap,
    time_lapse,
)
from moa.inference.pipeline import MoAPipeline, Subject
from moa.inference.visualize import router_map_figure, subject_attention_figure
from moa.models.model import EXPORT_WEIGHTS, MoAModel
from moa.models.unet import MoALayoutError, moa_processors, moa_state_dict

STEPS = 4


@pytest.fixture(scope="module")
def faces():
    protocol = load_protocol()
    return [protocol.reference_image(s) for s in ("000001", "000612")]


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*moa_processors(model.unet).values(), model.prompt_encoder]:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    model = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip").eval()
    _randomize(model)
    pipeline = MoAPipeline.from_moa_model(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _gen(seed, n=1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _np(out):
    return np.asarray(out.images)


def test_prior_only_equals_stable_diffusion_pipeline(pipe, tiny_dir):
    reference = StableDiffusionPipeline.from_pretrained(tiny_dir / "stable-diffusion", safety_checker=None)
    reference.scheduler = UniPCMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    prompt = ["a man holding a red ball in a park", "a woman on a beach"]
    expected = reference(prompt, num_inference_steps=STEPS, generator=_gen(3, 2), output_type="np").images
    got = _np(pipe(prompt, num_inference_steps=STEPS, generator=_gen(3, 2), output_type="np"))
    diff = np.abs(expected - got).max()
    print(f"prior-only MoA pipeline vs StableDiffusionPipeline: max abs pixel diff {diff:.2e}")
    assert diff <= 1e-5


def test_same_seed_same_image_and_any_image_regenerates_alone(pipe, faces):
    prompts = ["a man holding a red ball", "a woman in a park"]
    subjects = [[Subject(faces[0], "man")], [Subject(faces[1], "woman")]]
    batch = _np(pipe(prompts, subjects, num_inference_steps=STEPS, generator=_gen(7, 2), output_type="np"))
    again = _np(pipe(prompts, subjects, num_inference_steps=STEPS, generator=_gen(7, 2), output_type="np"))
    assert np.array_equal(batch, again)
    alone = _np(pipe(prompts[1], subjects[1], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(8)],
                     output_type="np"))
    assert np.abs(alone[0] - batch[1]).max() <= 1e-5
    prior = _np(pipe(prompts[1], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(8)], output_type="np"))
    assert np.abs(prior[0] - batch[1]).max() > 1e-3, "the subject must change the image"


def test_guidance_gives_the_unconditional_half_no_subject(pipe, faces):
    """Classifier-free guidance contrasts the subject-conditioned prediction with one that has no
    subject (as training drops text and subjects together): the U-Net's unconditional half must get
    the plain negative-prompt embeddings in every block, the conditional half the subject token."""
    seen = []

    def capture(module, args, kwargs):
        moa = kwargs["cross_attention_kwargs"]["moa"]
        seen.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"], moa.personalized_condition))

    handle = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe("a man holding a red ball", [Subject(faces[0], "man")], num_inference_steps=2, guidance_scale=5.0,
             generator=_gen(3))
    finally:
        handle.remove()
    text, condition = seen[0]
    assert text.shape[0] == 2 and condition.shape[0] == 2
    unconditional = condition[0]  # (blocks, tokens, dim)
    assert torch.equal(unconditional, text[0].expand_as(unconditional))
    assert not torch.allclose(condition[1], text[1].expand_as(condition[1]))


def test_subject_guidance_scales_only_the_subjects_share(pipe, faces):
    """``subject_guidance_scale`` = ``guidance_scale`` is plain guidance; at 0 the subjects' share is
    scaled away, so which subject image is given no longer matters; any other value changes the image."""
    prompt, subjects = "a man holding a red ball", [Subject(faces[0], "man")]

    def generate(subject_lists, **scales):
        return _np(pipe(prompt, subject_lists, num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(4),
                        output_type="np", **scales))

    plain = generate(subjects)
    assert np.abs(generate(subjects, subject_guidance_scale=5.0) - plain).max() <= 1e-5
    other = [Subject(faces[1], "man")]  # another face: a small change in this random model, made visible at 20
    for scale, differs in ((20.0, True), (0.0, False)):
        change = np.abs(generate(other, subject_guidance_scale=scale) - generate(subjects, subject_guidance_scale=scale))
        assert (change.max() > 1e-3) if differs else (change.max() <= 1e-5), (scale, change.max())
    with pytest.raises(ValueError, match="subject_guidance_scale=2.0 needs classifier-free guidance"):
        pipe(prompt, subjects, num_inference_steps=STEPS, guidance_scale=1.0, subject_guidance_scale=2.0)


def _extra_token_bias(model):
    """The biases that make only the extra subject tokens (tokens 2..N of the last layer)."""
    return model.prompt_encoder.mlp[2].bias[model.text_encoder.config.hidden_size:]


@pytest.mark.parametrize("option, extra_bias", [
    ({"tokens_per_subject": 3}, _extra_token_bias),
    ({"patch_tokens": True}, lambda model: model.prompt_encoder.patch_projection[0].bias),
], ids=["tokens_per_subject", "patch_tokens"])
def test_extra_subject_tokens_generate_and_any_image_regenerates_alone(faces, tiny_dir, option, extra_bias):
    """With extra keys per subject (more tokens, or patch tokens) a prompt's condition is longer; a prompt
    batched beside one with more subjects gets masked padding keys and must still give the image it
    gives alone."""
    model = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip", **option).eval()
    _randomize(model)
    multi = MoAPipeline.from_moa_model(model)
    multi.set_progress_bar_config(disable=True)
    prompts = ["a man and a woman in a park", "a woman on a beach"]
    subjects = [[Subject(faces[0], "man"), Subject(faces[1], "woman")], [Subject(faces[1], "woman")]]
    batch = _np(multi(prompts, subjects, num_inference_steps=STEPS, generator=_gen(5, 2), output_type="np"))
    alone = _np(multi(prompts[1], subjects[1], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(6)],
                      output_type="np"))
    assert np.abs(alone[0] - batch[1]).max() <= 1e-5
    with torch.no_grad():  # change only the extra tokens (not by a constant: each is layer-normalised)
        bias = extra_bias(model)
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    changed = _np(multi(prompts[1], subjects[1], num_inference_steps=STEPS,
                        generator=[torch.Generator().manual_seed(6)], output_type="np"))
    assert np.abs(changed[0] - alone[0]).max() > 1e-3


def test_subject_swap_and_morphing_endpoints(pipe, faces):
    prompt = "a man riding a horse"
    a, b = Subject(faces[0], "man"), Subject(faces[1], "man")
    swapped = subject_swap(pipe, prompt, [[a], [b]], seed=1, num_inference_steps=STEPS, output_type="np")
    morphs = morph(pipe, prompt, a, b, [0.0, 0.5, 1.0], seed=1, num_inference_steps=STEPS, output_type="np")
    assert np.array_equal(_np(morphs[0]), _np(swapped[0]))
    assert np.array_equal(_np(morphs[2]), _np(swapped[1]))
    assert not np.array_equal(_np(morphs[1]), _np(morphs[0]))


def test_consistent_characters_is_the_same_subject_in_every_prompt(pipe, faces):
    prompts = ["a man reading a book", "a man riding a horse"]
    out = consistent_characters(pipe, prompts, [Subject(faces[0], "man")], seed=4, num_inference_steps=STEPS,
                                output_type="np")
    alone = pipe(prompts[1], [Subject(faces[0], "man")], num_inference_steps=STEPS, generator=_gen(4),
                 output_type="np")
    assert np.abs(_np(out)[1] - _np(alone)[0]).max() <= 1e-5


def test_time_lapse_endpoints_are_the_two_words(pipe, faces):
    subject = Subject(faces[0], "kid")
    outs = time_lapse(pipe, "a photo of a {}", "kid", "person", subject, [0.0, 1.0], seed=2,
                      num_inference_steps=STEPS, output_type="np")
    direct = pipe("a photo of a person", [Subject(faces[0], "person")], num_inference_steps=STEPS,
                  generator=_gen(2), output_type="np")
    assert np.abs(_np(outs[1]) - _np(direct)).max() <= 1e-5
    assert not np.array_equal(_np(outs[0]), _np(outs[1]))


def test_lora_lands_in_the_prior_only_and_unloads_exactly(pipe, faces, tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    donor = UNet2DConditionModel.from_pretrained(tiny_dir / "stable-diffusion", subfolder="unet")
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor))
    args = dict(prompt="a man holding a cup", subjects=[Subject(faces[0], "man")], num_inference_steps=STEPS,
                output_type="np")
    before = _np(pipe(**args, generator=_gen(5)))
    personalized = {k: v.clone() for k, v in moa_state_dict(pipe.unet).items()}
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    try:
        styled = _np(pipe(**args, generator=_gen(5)))
        assert np.abs(styled - before).max() > 1e-3, "the LoRA must change the image"
        after_keys = moa_state_dict(pipe.unet)
        assert after_keys.keys() == personalized.keys(), "the LoRA touched the personalized experts"
        assert all(torch.equal(after_keys[k], v) for k, v in personalized.items())
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(_np(pipe(**args, generator=_gen(5))), before)


def test_controlnet_runs_and_zero_scale_is_a_no_op(pipe, faces, tiny_dir):
    base = UNet2DConditionModel.from_pretrained(tiny_dir / "stable-diffusion", subfolder="unet")
    controlnet = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(16, 32, 64))
    pose = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    args = dict(prompt="a man dancing", subjects=[Subject(faces[0], "man")], num_inference_steps=STEPS, output_type="np")
    plain = _np(pipe(**args, generator=_gen(4)))
    with torch.no_grad():
        for p in controlnet.controlnet_mid_block.parameters():
            p.normal_(0, 0.1)
    controlled = _np(pipe(**args, generator=_gen(4), controlnet=controlnet, control_image=pose))
    zero = _np(pipe(**args, generator=_gen(4), controlnet=controlnet, control_image=pose,
                    controlnet_conditioning_scale=0.0))
    assert np.abs(controlled - plain).max() > 1e-4
    assert np.abs(zero - plain).max() <= 1e-6


def test_ddim_inversion_reconstructs_and_real_image_swap_runs(pipe, faces, synthetic_root, tiny_dir):
    """DDIM inversion is exact when the noise prediction does not change along the path; a U-Net whose
    output layer is a constant is such a model, so any misalignment of the inverse and forward
    schedules shows up as reconstruction error. (The tiny random prior is far from smooth, so its
    error says nothing about SD1.5.)"""
    from diffusers import DDIMScheduler

    photo = Image.open(next(synthetic_root.glob("*/*.jpg"))).convert("RGB").resize((64, 64))
    model = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip").eval()
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.normal_(0, 0.5)
    constant = MoAPipeline.from_moa_model(model, scheduler=DDIMScheduler.from_config(model.noise_scheduler.config))
    constant.set_progress_bar_config(disable=True)
    inverted, clean = ddim_invert(constant, photo, "a person", num_inference_steps=20)
    assert (inverted - clean).abs().max() > 0.1, "inversion must move the latent"
    rebuilt = constant("a person", latents=inverted, num_inference_steps=20, guidance_scale=1.0,
                       output_type="latent").images
    error = ((rebuilt - clean).norm() / clean.norm()).item()
    print(f"DDIM inversion + regeneration, constant-noise U-Net, 20 steps: relative latent error {error:.2e}")
    assert error < 1e-4
    swapped = real_image_subject_swap(pipe, photo, "a person", [Subject(faces[1], "person")], num_inference_steps=5,
                                      output_type="np")
    assert _np(swapped).shape == (1, 64, 64, 3)


def test_router_and_attention_maps_are_reported_and_drawn(pipe, faces):
    out = pipe("a man and a woman", [Subject(faces[0], "man"), Subject(faces[1], "woman")],
               num_inference_steps=STEPS, generator=_gen(0), record_router_maps=True, record_attention_maps=True)
    assert len(out.router_maps) == 32 and len(out.attention_maps) == 16
    first = next(iter(out.router_maps.values()))
    assert first.shape == (STEPS, 1, 256)
    assert next(iter(out.attention_maps.values())).shape[-1] == 2
    figure = router_map_figure(out.images[0], out.router_maps, latent_size=(16, 16))
    assert figure.size[0] > 100 and figure.size[1] > 100
    attention = subject_attention_figure(out.images[0], out.attention_maps, subject=1, latent_size=(16, 16))
    assert attention.size[1] > 100
    # the maps are laid over the image: a figure over a black and over a white image differ in the cells
    black, white = (router_map_figure(Image.new("RGB", out.images[0].size, c), out.router_maps, latent_size=(16, 16),
                                      layers=list(out.router_maps)[:2], max_columns=2) for c in ("black", "white"))
    difference = (np.asarray(black, dtype=float) - np.asarray(white, dtype=float)).mean()
    assert difference < -20, f"the overlay does not show the image through (mean difference {difference:.1f})"
    with pytest.raises(KeyError, match="no maps recorded"):
        router_map_figure(out.images[0], out.router_maps, latent_size=(16, 16), layers=["not.a.layer"])


def test_clear_errors_before_generation(pipe, faces, tmp_path, tiny_dir):
    with pytest.raises(SubjectBindingError, match="'woman'"):
        pipe("a man on a horse", [Subject(faces[0], "woman")], num_inference_steps=STEPS)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg.*cannot be read"):
        pipe("a man on a horse", [Subject(broken, "man")], num_inference_steps=STEPS)
    width, height = Image.open(faces[0]).size
    for wrong in (np.ones((height // 2, width), bool), np.ones((height, width, 3), bool)):
        with pytest.raises(ValueError, match=r"subject 'man': mask of shape .* expected the image's"):
            pipe("a man on a horse", [Subject(faces[0], "man", mask=wrong)], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="prompt=None: give a prompt"):
        pipe(None, num_inference_steps=STEPS)
    for wrong_prompt in (3, ["a man", 4], []):
        with pytest.raises(TypeError, match="expected a string or a non-empty list of strings"):
            pipe(wrong_prompt, num_inference_steps=STEPS)
    export = pipe.moa.export_moa(tmp_path / "export")
    weights = load_file(export / EXPORT_WEIGHTS)
    weights.pop(next(k for k in weights if k.startswith("unet.up_blocks")))
    save_file(weights, export / EXPORT_WEIGHTS)
    with pytest.raises(MoALayoutError, match="1 missing"):
        MoAPipeline.from_moa(tiny_dir / "stable-diffusion", tiny_dir / "clip", export)


def test_generate_command_writes_images_and_a_reproducible_record(pipe, tmp_path, tiny_dir, faces):
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from moa.inference.generate import generate
    from tests.conftest import CONF_DIR

    weights = pipe.moa.export_moa(tmp_path / "weights")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[
            f"base_model={tiny_dir}/stable-diffusion", f"image_encoder={tiny_dir}/clip",
            f"moa_weights={weights}", "num_inference_steps=3", "device=cpu", f"paths.root_dir={tmp_path}",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.requests = [{"prompt": "a man in a park", "subjects": [{"image": str(faces[0]), "word": "man"}], "seed": 3},
                        {"prompt": "a man in a park", "subjects": [], "seed": 3}]
    records = generate(cfg)
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert record["moa_weights_sha256"] and record["base_model_sha256"] and record["scheduler"] == "UniPCMultistepScheduler"
    assert [r["seed"] for r in records] == [3, 3]
    assert (tmp_path / "out" / "0000_seed3_router_maps.png").exists()
    assert not (tmp_path / "out" / "0001_seed3_router_maps.png").exists()  # prior-only: no router
    regenerated = pipe("a man in a park", [Subject(faces[0], "man")], num_inference_steps=3,
                       generator=[torch.Generator().manual_seed(3)]).images[0]
    written = Image.open(tmp_path / "out" / "0000_seed3.png")
    assert np.abs(np.asarray(regenerated, dtype=int) - np.asarray(written, dtype=int)).max() <= 1


def test_moving_the_pipeline_moves_the_prompt_encoder_too(tiny_dir, faces):
    model = MoAModel.from_pretrained(tiny_dir / "stable-diffusion", tiny_dir / "clip").eval()
    pipe = MoAPipeline.from_moa_model(model).to(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert next(model.prompt_encoder.parameters()).dtype == torch.float64
    out = pipe("a man in a park", [Subject(faces[0], "man")], num_inference_steps=2, output_type="np")
    assert np.isfinite(_np(out)).all()


def test_an_ldm_single_file_base_model_loads_to_the_same_model_as_its_folder(tiny_dir, tmp_path, compose_cfg):
    from moa.models.model import load_base_components
    from tests.ldm_format import write_ldm_checkpoint

    single_file = write_ldm_checkpoint(tiny_dir / "stable-diffusion", tmp_path / "tiny-ldm.safetensors")
    folder = load_base_components(tiny_dir / "stable-diffusion")
    loaded = load_base_components(single_file, base_model_config=str(tiny_dir / "stable-diffusion"))
    for part in ("unet", "vae", "text_encoder"):
        a, b = folder[part].state_dict(), loaded[part].state_dict()
        assert a.keys() == b.keys(), part
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst == 0.0, f"{part}: weights differ by {worst}"
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        outputs = [c["unet"](latents, 10, text).sample for c in (folder, loaded)]
    # The weights are bitwise equal (above); the forward pass is compared at float32 rounding, not bitwise:
    # on one CPU the two loads gave outputs 7e-7 apart with equal weights, strides and dtypes (kernels may
    # sum in another order for other memory). A wrong config moves the output by orders of magnitude more.
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
    assert loaded["tokenizer"]("a man").input_ids == folder["tokenizer"]("a man").input_ids
    # and the training command takes it the way moa_sd15 takes a community checkpoint
    from moa.training.run import train

    metrics, _ = train(compose_cfg(f"base_model={single_file}", f"base_model_config={tiny_dir / 'stable-diffusion'}",
                                   "trainer.max_steps=1", "callbacks=none", "export_dir=null", out=tmp_path / "run"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_demo_turns_bad_input_into_a_message_and_finds_no_run_clearly(pipe, faces, tmp_path):
    from moa.checks import ConfigError
    from moa.demo import Demo, newest_run_weights

    demo = Demo(pipe, num_inference_steps=STEPS, guidance_scale=5.0, layers_shown=2)
    face = Image.open(faces[0])
    empty = [None, "", None] * 3
    cases = {"has no image": [None, "man", None], "give the word": [face, "", None],
             "occurs 0 time": [face, "woman", None]}
    for expected, first in cases.items():
        *images, message = demo.generate("a man on a horse", 0, STEPS, 5.0, *first, *empty)
        assert images == [None, None, None] and expected in message, message
    prior, moa, overlay, message = demo.generate("a man on a horse", 0, STEPS, 5.0, face, "man", None, *empty)
    assert message == "" and prior.size == moa.size and overlay.size[0] > moa.size[0]
    assert min(moa.size) >= 256, "small images are enlarged for the page"
    with pytest.raises(ConfigError, match="run `python train.py` first"):
        newest_run_weights(tmp_path / "no-runs")
