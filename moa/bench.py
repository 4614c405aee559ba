"""What MoA costs over the model it extends, measured side by side in one run.

    python -m moa.bench                 # everything; CPU: 32x32 latents, fp32; GPU: 64x64 latents, bf16
    python -m moa.bench --only train    # some parts: train | sample | data | embedded | recipe
                                        #   | train_compiled | sample_compiled (default on a GPU only)

Parts:
- train: one training step of an SD1.5-shape U-Net (random weights; ``TrainStep``) as MoA with a frozen
  prior (image encoder of CLIP ViT-L/14 shape on the real subject slots, router and object losses), MoA
  with the denoising loss alone, the plain U-Net with only its attention projections trainable, and the
  whole U-Net trainable (FastComposer-style). For each: GFLOP of forward + backward (SD1.5 shape, batch
  1, counted on meta tensors on any device), time per step (all variants in interleaved rounds, per
  batch size; GPU: 4 and the paper's 32 with gradient checkpointing) and peak memory alone (GPU: max
  allocated; CPU: the resident set of a fresh process). Each time ratio is printed beside its FLOP
  ratio, the floor it could reach. Also the share of a real step that the VAE and text encoder take.
- sample: time and GFLOP per denoising step (classifier-free guidance, U-Net batch 2) of the MoA
  U-Net with 1 and 2 subjects and prior-only, against the plain U-Net.
- train_compiled, sample_compiled: the same with the U-Net under ``torch.compile`` (as
  ``model.compile_unet=true`` trains it; sampling on a GPU with CUDA graphs, ``mode="reduce-overhead"``)
  beside eager, MoA against the full finetune / plain U-Net compiled alike; the first call's seconds
  (compilation) reported apart. A variant that fails to compile is reported with its error, not dropped
  silently. Meant for a GPU: on a CPU inductor compiles an SD1.5 U-Net for many minutes.
- data: samples/second of the training DataModule (folder and shards; 0, 1 and 2 workers) against
  the samples/second one training step of the tiny default consumes.
- embedded: wall time of ``python train.py``.
- recipe: what each training-recipe option costs per step of the tiny default (model.subject_dropout,
  model.snr_gamma, model.ema_decay, model.frozen_dtype=bf16 against fp32 frozen weights, both under
  bf16 autocast) and per sample (data.augmentation + target flip), side by side in alternating rounds.

Prints a table and writes JSON after every part (ratios in ``*_ratio`` fields); ``moa/bench_results.json`` beside
this file holds the latest committed run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RESULTS = Path(__file__).with_name("bench_results.json")
TRAIN_VARIANTS = ("moa", "moa_without_map_losses", "attention_only", "full")
COMPILED = "_compiled"
COMPILED_TRAIN_VARIANTS = ("moa", "full")
PARTS = ("train", "sample", "data", "embedded", "recipe")
COMPILED_PARTS = ("train_compiled", "sample_compiled")  # by default on a GPU only: inductor on a CPU takes long
FLOP_LATENT = 64  # SD1.5 at 512x512: FLOPs are always counted at the real shape, batch 1

# CLIP ViT-L/14 (the image encoder of MoA and FastComposer, and SD1.5's text encoder): published shapes.
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768)
CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, projection_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)


def _device_settings() -> dict:
    """GPU: the paper's per-GPU batch (32 at 64x64 latents, bf16-mixed, gradient checkpointing) and a
    small one. CPU: what fits 2 cores and 24 GiB in minutes."""
    if torch.cuda.is_available():
        return {"device": "cuda", "dtype": "bfloat16", "latent": 64, "train_batches": [4, 32],
                "checkpointing_from_batch": 32, "rounds": 10, "warmup": 3, "compile_backend": "inductor"}
    return {"device": "cpu", "dtype": "float32", "latent": 32, "train_batches": [1], "checkpointing_from_batch": None,
            "rounds": 3, "warmup": 1, "compile_backend": "inductor"}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device_type="cpu" if device == "meta" else device, dtype=dtype,
                          enabled=dtype != torch.float32 and device != "meta")


def _sd15_unet(device: str, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    from moa.tiny import SD15_UNET_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet if dtype == torch.float32 else unet.to(dtype=dtype)


def _image_encoder(device: str):
    """fp32 weights under autocast, like the U-Net: training's default ``model.frozen_dtype``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION)).eval()


def count_flops(run) -> float:
    """GFLOP of ``run()``, attention forced to the math backend so that the counter sees it (it has no
    entry for the CPU flash kernel); run it on meta tensors to count without computing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


class TrainStep:
    """One training step of ``variant`` on an SD1.5-shape U-Net, as ``MoALitModule`` takes it once the
    batch is encoded: (a) ``moa``: MoA with the frozen prior, the image encoder on the real subject slots
    (1 of 2 per sample) and the router and object losses; (b) ``moa_without_map_losses``: the same with
    the denoising loss alone; (c) ``attention_only``: the plain U-Net with only its attention projections
    trainable; (d) ``full``: the whole U-Net trainable (FastComposer-style).

    ``unet`` may be shared between variants: ``prepare()`` (untimed) sets the trainable parameters of
    this one. ``on(torch.compile(unet))`` gives the compiled twin, variant ``<name>_compiled``.
    """

    def __init__(self, variant: str, unet, *, batch: int, latent: int, device: str, dtype: torch.dtype,
                 image_encoder=None, prompt_encoder=None, loss_layers: frozenset[str] = frozenset()):
        from moa.models.losses import MaskedDenoisingLoss, ObjectLocalizationLoss, RouterLoss

        self.variant, self.unet, self.device, self.dtype = variant, unet, device, dtype
        self.image_encoder, self.prompt_encoder = image_encoder, prompt_encoder
        self.is_moa = variant.startswith("moa")
        self.loss_layers = loss_layers if variant == "moa" else frozenset()
        if self.is_moa:
            self.trainable = [p for n, p in unet.named_parameters() if ".processor." in n]
            self.trainable += list(prompt_encoder.parameters())
        elif variant == "attention_only":
            self.trainable = [p for n, p in unet.named_parameters()
                              if any(f".{k}." in n for k in ("to_q", "to_k", "to_v", "to_out"))]
        else:
            self.trainable = [p for n, p in unet.named_parameters() if ".processor." not in n]
        self.optimizer = None if device == "meta" else torch.optim.AdamW(self.trainable, lr=1e-5)
        with torch.device(device):
            self.latents = torch.randn(batch, 4, latent, latent)
            self.noise = torch.randn_like(self.latents)
            self.timesteps = torch.randint(0, 800, (batch,))
            self.mask = (torch.rand(batch, 1, latent, latent) > 0.5).float()
            self.text = torch.randn(batch, 77, 768)
            self.subject_pixels = torch.randn(batch, 2, 3, 224, 224)
            self.real_slots = torch.arange(0, 2 * batch, 2)  # one subject and one padding slot per sample
            self.token_index = torch.tensor([2, 5]).expand(batch, -1)
            self.valid = torch.tensor([True, False]).expand(batch, -1)
        self.losses = (MaskedDenoisingLoss(), RouterLoss(), ObjectLocalizationLoss())

    def on(self, unet) -> TrainStep:
        """This step on another module of the same weights (``torch.compile(unet)``): the same inputs
        and optimizer (one Adam state: two of a full finetune's would not fit a 24 GiB machine)."""
        twin = copy.copy(self)
        twin.variant, twin.unet = self.variant + COMPILED, unet
        return twin

    def prepare(self) -> None:
        self.unet.requires_grad_(False)
        for parameter in self.trainable:
            parameter.requires_grad_(True)

    def loss(self) -> torch.Tensor:
        from moa.models.inputs import MoAInputs
        from moa.models.model import encode_images
        from moa.models.prompt import personalize_text

        with _autocast(self.device, self.dtype):
            kwargs, moa = {}, None
            if self.is_moa:
                with torch.no_grad():
                    features = encode_images(self.image_encoder, self.subject_pixels, self.real_slots)
                words = torch.gather(self.text, 1, self.token_index[..., None].expand(-1, -1, 768))
                tokens = self.prompt_encoder(features.to(words.dtype), words, self.timesteps)
                condition, key_mask = personalize_text(self.text, tokens.to(self.text.dtype), self.token_index,
                                                       self.valid)
                moa = MoAInputs(personalized_condition=condition, personalized_key_mask=key_mask,
                                subject_token_index=self.token_index,
                                record_router_layers=self.loss_layers, record_attention_layers=self.loss_layers)
                kwargs["cross_attention_kwargs"] = {"moa": moa}
            prediction = self.unet(self.latents, self.timesteps, self.text, **kwargs).sample
            loss = self.losses[0](prediction, self.noise, self.mask)
            if self.loss_layers:
                subject_masks = self.mask.expand(-1, 2, -1, -1)
                loss = loss + 1e-4 * self.losses[1](moa.router_maps, self.mask)[0] \
                    + 1e-4 * self.losses[2](moa.subject_attention, subject_masks, self.valid)
        return loss

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_steps(variants, *, batch: int, latent: int, device: str, dtype: torch.dtype,
                checkpointing: bool = False, compile_backend: str | None = None) -> dict[str, TrainStep]:
    """The ``variants`` as ``TrainStep``s on one U-Net (two SD1.5 U-Nets and a full finetune's Adam state
    do not fit a 24 GiB machine). MoA is installed when a MoA variant is asked for; the plain variants
    then call it without MoA inputs, which runs diffusers' own ``AttnProcessor2_0`` in every layer.
    With ``compile_backend``, each variant also as ``<variant>_compiled`` on ``torch.compile(unet)``
    (same weights)."""
    from moa.models.prompt import MultimodalPromptEncoder
    from moa.models.unet import MoAConfig, install_moa, loss_layer_names

    unet = _sd15_unet(device)
    moa_parts = {}
    if any(variant.startswith("moa") for variant in variants):
        install_moa(unet)
        with torch.device(device):
            prompt_encoder = MultimodalPromptEncoder(image_dim=768, text_dim=768)
        moa_parts = dict(image_encoder=_image_encoder(device),
                         prompt_encoder=prompt_encoder, loss_layers=loss_layer_names(unet, MoAConfig()))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    steps = {variant: TrainStep(variant, unet, **(moa_parts if variant.startswith("moa") else {}), batch=batch,
                                latent=latent, device=device, dtype=dtype) for variant in variants}
    if compile_backend is not None:
        compiled = torch.compile(unet, backend=compile_backend)
        steps.update({variant + COMPILED: steps[variant].on(compiled) for variant in variants})
    return steps


def train_flops() -> dict[str, float]:
    """GFLOP of one forward + backward of each training variant, SD1.5 shape, batch 1 (meta tensors)."""
    flops = {}
    for variant, step in train_steps(TRAIN_VARIANTS, batch=1, latent=FLOP_LATENT, device="meta",
                                     dtype=torch.float32).items():
        step.prepare()
        flops[variant] = count_flops(lambda: step.loss().backward())
    return flops


def _encoders(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        vae, text_encoder = AutoencoderKL(**SD15_VAE), CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    if dtype != torch.float32:
        vae, text_encoder = vae.to(dtype=dtype), text_encoder.to(dtype=dtype)
    return vae.eval(), text_encoder.eval()


def encode_runs(*, batch: int, latent: int, device: str, dtype: torch.dtype) -> dict:
    """What a real step runs before the U-Net (``MoALitModule.compute_losses``), frozen and without
    gradient: ``vae_encode`` of the images (8x the latent size), ``text_encoder`` of 77-token captions."""
    vae, text_encoder = _encoders(device, dtype)
    with torch.device(device):
        images, ids = torch.randn(batch, 3, 8 * latent, 8 * latent, dtype=dtype), torch.zeros(batch, 77, dtype=torch.long)
    return {"vae_encode": torch.no_grad()(lambda: vae.encode(images).latent_dist.sample()),
            "text_encoder": torch.no_grad()(lambda: text_encoder(ids))}


def encode_flops() -> dict[str, float]:
    """GFLOP per sample of ``encode_runs`` at SD1.5's 512x512 (meta tensors)."""
    runs = encode_runs(batch=1, latent=FLOP_LATENT, device="meta", dtype=torch.float32)
    return {name: count_flops(run) for name, run in runs.items()}


def peak_memory_gib(variant: str, batch: int, settings: dict) -> float:
    """Peak memory of training ``variant`` alone (GPU: max allocated; CPU: resident set of a fresh process)."""
    if settings["device"] == "cpu":
        out = subprocess.run([sys.executable, "-m", "moa.bench", "--train-variant", variant, "--train-batch", str(batch)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_memory_gib"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _train_alone(variant, batch, settings)
    _sync("cuda")
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    return peak


def _train_steps_at(settings: dict, variants, batch: int, compile_backend: str | None = None) -> dict[str, TrainStep]:
    threshold = settings["checkpointing_from_batch"]
    return train_steps(variants, batch=batch, latent=settings["latent"], device=settings["device"],
                       dtype=getattr(torch, settings["dtype"]), checkpointing=threshold is not None and batch >= threshold,
                       compile_backend=compile_backend)


def _train_alone(variant: str, batch: int, settings: dict) -> None:
    """Two steps of ``variant`` with nothing else built: what its peak memory is read after."""
    step = _train_steps_at(settings, [variant], batch)[variant]
    step.prepare()
    for _ in range(2):
        step()


def _peak_resident_gib() -> float:
    """This process's peak resident set. Linux's ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss``
    (the fallback elsewhere) carries the parent's peak over into a child."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_train(settings: dict) -> dict:
    """FLOPs (SD1.5 shape, batch 1), then per batch size: time per step of every variant in interleaved
    rounds, peak memory of each alone, and each time ratio beside its FLOP ratio."""
    flops = train_flops()
    encode = encode_flops()
    results = {"gflop_per_sample": flops, "encode_gflop_per_sample": encode,
               "encode_share_of_moa_step_flops": sum(encode.values()) / (sum(encode.values()) + flops["moa"])}
    for batch in settings["train_batches"]:
        memory = {v: peak_memory_gib(v, batch, settings) for v in TRAIN_VARIANTS}
        steps = _train_steps_at(settings, TRAIN_VARIANTS, batch)
        encode_parts = list(encode_runs(batch=batch, latent=settings["latent"], device=settings["device"],
                                        dtype=getattr(torch, settings["dtype"])).values())
        seconds = interleaved_seconds({**steps, "encode": lambda: [run() for run in encode_parts]},
                                      rounds=settings["rounds"],
                                      warmup=settings["warmup"], device=settings["device"])
        trainable = {v: sum(p.numel() for p in step.trainable) / 1e6 for v, step in steps.items()}
        del steps
        encode_parts.clear()  # frees the VAE and text encoder before the next batch size's models
        row = {"step_seconds": seconds, "peak_memory_gib": memory, "trainable_parameters_m": trainable}
        for other in ("attention_only", "full"):
            row[f"moa_vs_{other}_time_ratio"] = seconds["moa"] / seconds[other]
            row[f"moa_vs_{other}_flop_ratio"] = flops["moa"] / flops[other]
        row["moa_without_map_losses_vs_attention_only_time_ratio"] = (seconds["moa_without_map_losses"]
                                                                      / seconds["attention_only"])
        row["moa_without_map_losses_vs_attention_only_flop_ratio"] = (flops["moa_without_map_losses"]
                                                                      / flops["attention_only"])
        row["moa_vs_full_peak_memory_ratio"] = memory["moa"] / memory["full"]
        row["encode_share_of_moa_step_time"] = seconds["encode"] / (seconds["encode"] + seconds["moa"])
        results[f"batch_{batch}"] = row
        log.info("train batch %d: %s", batch, row)
    return results


def bench_train_compiled(settings: dict) -> dict:
    """Per batch size: MoA and the full finetune, eager and compiled, timed in interleaved rounds after
    one untimed first call each (its seconds: mostly compilation)."""
    flops = train_flops()
    results = {}
    for batch in settings["train_batches"]:
        steps = _train_steps_at(settings, COMPILED_TRAIN_VARIANTS, batch, compile_backend=settings["compile_backend"])
        first, errors = first_call_seconds(steps, settings["device"])
        seconds = interleaved_seconds(steps, rounds=settings["rounds"], warmup=settings["warmup"],
                                      device=settings["device"])
        del steps
        row = {"step_seconds": seconds, "first_call_seconds": first, "errors": errors,
               "moa_vs_full_flop_ratio": flops["moa"] / flops["full"]}
        row.update(_compiled_ratios(seconds, COMPILED_TRAIN_VARIANTS))
        if {"moa" + COMPILED, "full" + COMPILED} <= seconds.keys():
            row["moa_vs_full_compiled_time_ratio"] = seconds["moa" + COMPILED] / seconds["full" + COMPILED]
        results[f"batch_{batch}"] = row
        log.info("compiled train batch %d: %s", batch, row)
    return results


def _compiled_ratios(seconds: dict[str, float], variants) -> dict[str, float]:
    return {f"{v}_compiled_vs_eager_time_ratio": seconds[v + COMPILED] / seconds[v]
            for v in variants if v + COMPILED in seconds}


def first_call_seconds(runs: dict, device: str) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds of each run's first call (a compiled run compiles in it). A run that raises is taken out
    of ``runs`` (in place) and its error returned, so one variant that does not compile costs the GPU
    session its own numbers only."""
    seconds, errors = {}, {}
    for name in list(runs):
        run = runs[name]
        if hasattr(run, "prepare"):
            run.prepare()
        _sync(device)
        start = time.perf_counter()
        try:
            run()
            _sync(device)
        except Exception as error:  # noqa: BLE001 - the failure is this variant's result, written to the JSON
            log.exception("%s failed on its first call", name)
            errors[name] = f"{type(error).__name__}: {error}"
            del runs[name]
            continue
        seconds[name] = time.perf_counter() - start
    return seconds, errors


def interleaved_seconds(runs: dict, *, rounds: int, device: str, warmup: int = 0) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds so that a change in
    the machine's load hits every candidate alike. A run with a ``prepare()`` gets it, untimed, first."""
    samples = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        for name, run in runs.items():
            if hasattr(run, "prepare"):
                run.prepare()
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def sample_runs(device: str, dtype: torch.dtype, latent: int, compile_backend: str | None = None) -> dict:
    """One denoising step with classifier-free guidance (U-Net batch 2), as ``MoAPipeline`` runs it: the
    plain U-Net (diffusers' own processors) against MoA prior-only and with 1 or 2 subjects. With
    ``compile_backend``, each also as ``<name>_compiled`` (on a GPU with CUDA graphs)."""
    from moa.models.inputs import MoAInputs
    from moa.models.prompt import MultimodalPromptEncoder, personalize_text
    from moa.models.unet import install_moa

    plain_unet = _sd15_unet(device, dtype).eval()
    unet = _sd15_unet(device, dtype).eval()  # same seed: the same weights, MoA installed below
    install_moa(unet)
    with torch.device(device):
        encoder = MultimodalPromptEncoder(image_dim=768, text_dim=768).to(dtype=dtype).eval()
        latents = torch.randn(2, 4, latent, latent, dtype=dtype)
        text = torch.randn(2, 77, 768, dtype=dtype)
        timestep = torch.tensor(500)

        # Per subject count: image features, word positions, and which are real (the unconditional half: none).
        subject_inputs = {subjects: (torch.randn(2, subjects, 768, dtype=dtype),
                                     torch.arange(2, 2 + subjects).expand(2, -1),
                                     torch.tensor([False, True])[:, None].expand(-1, subjects)) for subjects in (1, 2)}

    def with_subjects(unet, subjects: int):
        features, token_index, valid = subject_inputs[subjects]

        def run():
            words = torch.gather(text, 1, token_index[..., None].expand(-1, -1, 768))
            condition, key_mask = personalize_text(text, encoder(features, words, timestep.expand(2)), token_index, valid)
            moa = MoAInputs(personalized_condition=condition, personalized_key_mask=key_mask)
            return unet(latents, timestep, text, cross_attention_kwargs={"moa": moa})
        return run

    def runs_on(plain_unet, unet, suffix: str = "") -> dict:
        return {"plain" + suffix: lambda: plain_unet(latents, timestep, text),
                "moa_prior_only" + suffix: lambda: unet(latents, timestep, text,
                                                        cross_attention_kwargs={"moa": MoAInputs(prior_only=True)}),
                "moa_1_subject" + suffix: with_subjects(unet, 1), "moa_2_subject" + suffix: with_subjects(unet, 2)}

    runs = runs_on(plain_unet, unet)
    if compile_backend is not None:
        # CUDA graphs replay a sampling step's fixed shapes; each subject count gets its own graph.
        mode = "reduce-overhead" if device == "cuda" and compile_backend == "inductor" else None
        runs.update(runs_on(torch.compile(plain_unet, backend=compile_backend, mode=mode),
                            torch.compile(unet, backend=compile_backend, mode=mode), COMPILED))
    return runs


def bench_sample(settings: dict) -> dict:
    """Time (interleaved rounds) and FLOPs (SD1.5 shape) per denoising step, and their ratios to plain."""
    with torch.no_grad():
        flops = {name: count_flops(run) for name, run in sample_runs("meta", torch.float32, FLOP_LATENT).items()}
        runs = sample_runs(settings["device"], getattr(torch, settings["dtype"]), settings["latent"])
        seconds = interleaved_seconds(runs, rounds=settings["rounds"] + 2, warmup=settings["warmup"],
                                      device=settings["device"])
    results = {"step_seconds": seconds, "gflop": flops}
    for name in ("moa_1_subject", "moa_2_subject", "moa_prior_only"):
        results[f"{name}_vs_plain_time_ratio"] = seconds[name] / seconds["plain"]
        results[f"{name}_vs_plain_flop_ratio"] = flops[name] / flops["plain"]
    return results


def bench_sample_compiled(settings: dict) -> dict:
    """Eager and compiled sampling steps in interleaved rounds, after one untimed first call each."""
    with torch.no_grad():
        flops = {name: count_flops(run) for name, run in sample_runs("meta", torch.float32, FLOP_LATENT).items()}
        runs = sample_runs(settings["device"], getattr(torch, settings["dtype"]), settings["latent"],
                           compile_backend=settings["compile_backend"])
        first, errors = first_call_seconds(runs, settings["device"])
        seconds = interleaved_seconds(runs, rounds=settings["rounds"] + 2, warmup=settings["warmup"],
                                      device=settings["device"])
    results = {"step_seconds": seconds, "first_call_seconds": first, "errors": errors}
    results.update(_compiled_ratios(seconds, flops.keys()))
    if "plain" + COMPILED in seconds:
        for name in ("moa_1_subject", "moa_2_subject", "moa_prior_only"):
            if name + COMPILED in seconds:
                results[f"{name}_vs_plain_compiled_time_ratio"] = seconds[name + COMPILED] / seconds["plain" + COMPILED]
                results[f"{name}_vs_plain_flop_ratio"] = flops[name] / flops["plain"]
    return results


def bench_data(settings: dict, work: Path) -> dict:
    """DataModule throughput on the embedded data (folder and shards) vs what tiny training eats."""
    import hydra
    from hydra import compose, initialize_config_dir

    from moa.config import CONFIG_DIR
    from moa.data.datamodule import FFHQWildDataModule
    from moa.data.shards import pack_shards
    from moa.embedded import ensure_embedded_assets

    components, data_root = work / "tiny-components", work / "synthetic"
    ensure_embedded_assets(components_dir=str(components), data_root=str(data_root), num_samples=96, image_size=128)
    shards = pack_shards(data_root, work / "shards", samples_per_shard=32)
    results = {}
    for data_format, root in (("folder", data_root), ("shards", shards)):
        for workers in (0, 1, 2):
            datamodule = FFHQWildDataModule(root=str(root), base_model=str(components / "stable-diffusion"),
                                            image_encoder=str(components / "clip"), resolution=64, batch_size=4,
                                            num_workers=workers, data_format=data_format)
            loader = iter(datamodule.train_dataloader())
            next(loader)  # worker start-up is not throughput
            start, batches = time.perf_counter(), 40
            for _ in range(batches):
                next(loader)
            results[f"{data_format}_{workers}_workers_samples_per_second"] = batches * 4 / (time.perf_counter() - start)
            del loader

    # What one tiny training step consumes: the embedded default's model, batch and resolution.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"base_model={components}/stable-diffusion",
                                                       f"image_encoder={components}/clip", f"data.root={data_root}"])
    module = hydra.utils.instantiate(cfg.model)
    datamodule = FFHQWildDataModule(root=str(data_root), base_model=str(components / "stable-diffusion"),
                                    image_encoder=str(components / "clip"), resolution=64, batch_size=4, num_workers=0)
    datamodule.setup()
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset, batch_size=4)))
    optimizer = module.configure_optimizers()["optimizer"]
    times = []
    for step in range(6):
        start = time.perf_counter()
        loss = module.compute_losses(batch, torch.Generator().manual_seed(step))[0]["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    consumed = 4 / (sum(times[1:]) / len(times[1:]))
    results["tiny_training_consumes_samples_per_second"] = consumed
    results["folder_2_workers_vs_training_ratio"] = results["folder_2_workers_samples_per_second"] / consumed
    results["shards_2_workers_vs_training_ratio"] = results["shards_2_workers_samples_per_second"] / consumed
    return results


RECIPE_OPTIONS = {"subject_dropout": ["model.subject_dropout=0.1"], "snr_gamma": ["model.snr_gamma=5.0"],
                  "ema": ["model.ema_decay=0.999"]}


def bench_recipe(settings: dict, work: Path) -> dict:
    """Step time of each recipe option against the plain recipe (tiny default, batch 4), and sample
    time with augmentation against without."""
    from hydra import compose, initialize_config_dir

    from moa.config import CONFIG_DIR
    from moa.embedded import ensure_embedded_assets

    components, data_root = work / "tiny-components", work / "synthetic"
    ensure_embedded_assets(components_dir=str(components), data_root=str(data_root), num_samples=96, image_size=128)
    base = [f"base_model={components}/stable-diffusion", f"image_encoder={components}/clip", f"data.root={data_root}",
            "data.num_workers=0", "+data.augmentation._target_=moa.data.transforms.SubjectAugmentation",
            "data.target_flip_p=0.5"]

    def build(overrides: list[str]):
        import hydra

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*base, *overrides])
        torch.manual_seed(0)
        module = hydra.utils.instantiate(cfg.model)
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.setup()
        return module, datamodule

    def stepper(module, batch, autocast: bool):
        optimizer = module.configure_optimizers()["optimizer"]

        def step():
            with torch.autocast(settings["device"], dtype=torch.bfloat16, enabled=autocast):
                loss = module.compute_losses(batch, torch.Generator().manual_seed(0))[0]["loss"]
            loss.backward()
            optimizer.step()
            if module.ema is not None:  # what MoALitModule.optimizer_step adds after the step
                module.ema.step(module.model.trainable_parameters())
            optimizer.zero_grad()
        return step

    plain, datamodule = build([])
    dataset = datamodule.dataset
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    batch.pop("skipped")
    runs = {"plain": stepper(plain, batch, autocast=False)}
    for name, overrides in RECIPE_OPTIONS.items():
        runs[name] = stepper(build(overrides)[0], batch, autocast=False)
    runs["plain_bf16_autocast"] = stepper(plain, batch, autocast=True)
    runs["frozen_bf16_bf16_autocast"] = stepper(build(["model.frozen_dtype=bf16"])[0], batch, autocast=True)
    for run in runs.values():
        run()  # warm-up
    seconds = interleaved_seconds(runs, rounds=5, device=settings["device"])
    results = {f"{name}_step_seconds": value for name, value in seconds.items()}
    for name in RECIPE_OPTIONS:
        results[f"{name}_vs_plain_step_ratio"] = seconds[name] / seconds["plain"]
    results["frozen_bf16_vs_fp32_under_autocast_step_ratio"] = (seconds["frozen_bf16_bf16_autocast"]
                                                               / seconds["plain_bf16_autocast"])
    sample = interleaved_seconds({"plain": lambda: dataset[3], "augmented": lambda: dataset[(3, 7)]}, rounds=30,
                                 device="cpu")
    results["augmented_vs_plain_sample_ratio"] = sample["augmented"] / sample["plain"]
    results["augmented_sample_seconds"] = sample["augmented"]
    return results


def bench_embedded(work: Path) -> dict:
    """Wall time of the embedded default's run (``python train.py``, here as ``python -m moa.training``)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moa.training", f"hydra.run.dir={work}/embedded-run",
                    f"paths.cache_dir={work}/embedded-cache"], cwd=work, check=True, capture_output=True)
    return {"train_py_seconds": time.perf_counter() - start}


def _flatten(values: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, float):
            flat[f"{prefix}{key}"] = value
    return flat


def _table(results: dict) -> str:
    parts = {part: values for part, values in results.items() if part not in ("command", "settings", "machine")}
    rows = _flatten(parts)
    width = max(map(len, rows), default=20) + 2
    return "\n".join([f"{'measurement':<{width}} value", "-" * (width + 12),
                      *(f"{key:<{width}} {value:10.4f}" for key, value in rows.items())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[*PARTS, *COMPILED_PARTS], nargs="*")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON to write")
    parser.add_argument("--train-variant", choices=TRAIN_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--train-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = _device_settings()
    if args.train_variant:  # the per-variant child process of the CPU memory measurement
        _train_alone(args.train_variant, args.train_batch, settings)
        sys.stdout.write(json.dumps({"peak_memory_gib": _peak_resident_gib()}) + "\n")  # read by the parent
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(torch.get_num_threads())
    parts = args.only or [*PARTS, *(COMPILED_PARTS if settings["device"] == "cuda" else ())]
    results = {"command": "python -m moa.bench" + (f" --only {' '.join(parts)}" if args.only else ""),
               "settings": settings, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                  "threads": torch.get_num_threads(),
                                                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    with tempfile.TemporaryDirectory() as work:
        benches = {"train": lambda: bench_train(settings), "sample": lambda: bench_sample(settings),
                   "data": lambda: bench_data(settings, Path(work)), "embedded": lambda: bench_embedded(Path(work)),
                   "recipe": lambda: bench_recipe(settings, Path(work)),
                   "train_compiled": lambda: bench_train_compiled(settings),
                   "sample_compiled": lambda: bench_sample_compiled(settings)}
        for part in parts:
            start = time.perf_counter()
            results[part] = benches[part]()
            log.info("%s done in %.0fs", part, time.perf_counter() - start)
            # Written after every part: a later part that fails (or a GPU lease that ends) keeps the earlier ones.
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("results:\n%s", _table(results))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
