"""What MoA costs over the model it extends, measured side by side in one run.

    python -m moa.bench                 # everything; CPU: 32x32 latents, fp32; GPU: 64x64 latents, bf16
    python -m moa.bench --only train    # one part: train | sample | data | embedded

Parts:
- train: one optimizer step of an SD1.5-shape U-Net (random weights) as (a) MoA with a frozen prior,
  (b) the plain U-Net with only its attention projections trainable, (c) the whole U-Net trainable
  (FastComposer-style), and (d) MoA with the denoising loss alone (no router/object-loss maps), which
  says how much of (a)'s cost the map losses are. Time per step and peak memory (GPU: max allocated; CPU: the peak resident
  set of a fresh process per variant).
- sample: time per denoising step (classifier-free guidance, batch 1) of the MoA U-Net with 1 and 2
  subjects and prior-only, against the plain U-Net.
- data: samples/second of the training DataModule (folder and shards; 0, 1 and 2 workers) against
  the samples/second one training step of the tiny default consumes.
- embedded: wall time of ``python train.py``.
- recipe: what each training-recipe option costs per step of the tiny default (model.subject_dropout,
  model.snr_gamma, model.ema_decay, model.frozen_dtype=bf16 against fp32 frozen weights, both under
  bf16 autocast) and per sample (data.augmentation + target flip), side by side in alternating rounds.

Prints a table and writes JSON (ratios in ``*_ratio`` fields); ``moa/bench_results.json`` beside
this file holds the latest committed run.
"""

from __future__ import annotations

import argparse
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
TRAIN_VARIANTS = ("moa", "attention_only", "full", "moa_without_map_losses")


def _device_settings() -> dict:
    if torch.cuda.is_available():
        return {"device": "cuda", "dtype": "bfloat16", "latent": 64, "train_batch": 4, "steps": 10, "warmup": 3}
    return {"device": "cpu", "dtype": "float32", "latent": 32, "train_batch": 1, "steps": 3, "warmup": 1}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sd15_unet(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from moa.tiny import SD15_UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).to(device=device, dtype=dtype)


def _subject_inputs(unet, prompt_encoder, batch: int, subjects: int, device: str, dtype: torch.dtype):
    text = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    features = torch.randn(batch, subjects, 768, device=device, dtype=dtype)
    token_index = torch.arange(2, 2 + subjects, device=device).expand(batch, -1)
    valid = torch.ones(batch, subjects, dtype=torch.bool, device=device)
    return text, features, token_index, valid


def train_step_variant(variant: str, settings: dict) -> dict:
    """Time and peak memory of one optimizer step for ``variant`` (run in its own process on CPU)."""
    from moa.models.inputs import MoAInputs
    from moa.models.losses import MaskedDenoisingLoss, ObjectLocalizationLoss, RouterLoss
    from moa.models.prompt import MultimodalPromptEncoder, personalize_text
    from moa.models.unet import MoAConfig, install_moa, loss_layer_names

    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    unet = _sd15_unet(device, torch.float32)
    batch, size = settings["train_batch"], settings["latent"]
    prompt_encoder = None
    is_moa = variant.startswith("moa")
    if is_moa:
        trainable = install_moa(unet)
        prompt_encoder = MultimodalPromptEncoder(image_dim=768, text_dim=768).to(device)
        trainable += list(prompt_encoder.parameters())
        layers = loss_layer_names(unet, MoAConfig()) if variant == "moa" else []
    elif variant == "attention_only":
        unet.requires_grad_(False)
        trainable = [p for n, p in unet.named_parameters() if any(f".{k}." in n for k in ("to_q", "to_k", "to_v", "to_out"))]
        for p in trainable:
            p.requires_grad_(True)
    else:
        trainable = list(unet.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    latents = torch.randn(batch, 4, size, size, device=device)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 800, (batch,), device=device)
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    subject_masks = mask.expand(-1, 2, -1, -1)
    text, features, token_index, valid = _subject_inputs(unet, prompt_encoder, batch, 2, device, torch.float32)
    losses = (MaskedDenoisingLoss(), RouterLoss(), ObjectLocalizationLoss())

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            kwargs = {}
            if is_moa:
                words = torch.gather(text, 1, token_index[..., None].expand(-1, -1, 768))
                condition = personalize_text(text, prompt_encoder(features, words, timesteps), token_index, valid)
                moa = MoAInputs(personalized_condition=condition, subject_token_index=token_index,
                                record_router_layers=layers, record_attention_layers=layers)
                kwargs["cross_attention_kwargs"] = {"moa": moa}
            prediction = unet(latents, timesteps, text, **kwargs).sample
            if variant == "moa":
                loss = losses[0](prediction, noise, mask) + 1e-4 * losses[1](moa.router_maps, mask)[0] \
                    + 1e-4 * losses[2](moa.subject_attention, subject_masks, valid)
            else:
                loss = losses[0](prediction, noise, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(settings["warmup"]):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(settings["steps"]):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / settings["steps"]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"step_seconds": seconds, "peak_memory_gib": peak,
            "trainable_parameters_m": sum(p.numel() for p in trainable) / 1e6}


def bench_train(settings: dict) -> dict:
    results = {}
    for variant in TRAIN_VARIANTS:
        if settings["device"] == "cuda":
            results[variant] = train_step_variant(variant, settings)
            torch.cuda.empty_cache()
        else:  # a fresh process each, so the resident-set peak belongs to that variant alone
            out = subprocess.run([sys.executable, "-m", "moa.bench", "--train-variant", variant],
                                 capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        log.info("train %s: %s", variant, results[variant])
    a, b, c, d = (results[v] for v in TRAIN_VARIANTS)
    results["moa_vs_attention_only_step_ratio"] = a["step_seconds"] / b["step_seconds"]
    results["moa_without_map_losses_vs_attention_only_step_ratio"] = d["step_seconds"] / b["step_seconds"]
    results["moa_vs_full_peak_memory_ratio"] = a["peak_memory_gib"] / c["peak_memory_gib"]
    results["moa_vs_full_step_ratio"] = a["step_seconds"] / c["step_seconds"]
    return results


def interleaved_seconds(runs: dict, *, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds so that a change in
    the machine's load hits every candidate alike."""
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def bench_sample(settings: dict) -> dict:
    """Per denoising step with classifier-free guidance (U-Net batch 2), as ``MoAPipeline`` runs it:
    the plain U-Net (diffusers' own processors) against MoA prior-only and with 1 or 2 subjects."""
    from moa.models.inputs import MoAInputs
    from moa.models.prompt import MultimodalPromptEncoder, personalize_text
    from moa.models.unet import install_moa

    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    plain_unet = _sd15_unet(device, dtype).eval()
    unet = _sd15_unet(device, dtype).eval()  # same seed: the same weights, MoA installed below
    size = settings["latent"]
    latents = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    install_moa(unet)
    encoder = MultimodalPromptEncoder(image_dim=768, text_dim=768).to(device=device, dtype=dtype).eval()

    def with_subjects(subjects: int):
        features = torch.randn(2, subjects, 768, device=device, dtype=dtype)
        token_index = torch.arange(2, 2 + subjects, device=device).expand(2, -1)
        valid = torch.ones(2, subjects, dtype=torch.bool, device=device)
        valid[0] = False  # the unconditional half sees no subject

        def run():
            words = torch.gather(text, 1, token_index[..., None].expand(-1, -1, 768))
            condition = personalize_text(text, encoder(features, words, timestep.expand(2)), token_index, valid)
            unet(latents, timestep, text, cross_attention_kwargs={"moa": MoAInputs(personalized_condition=condition)})
        return run

    runs = {"plain": lambda: plain_unet(latents, timestep, text),
            "moa_prior_only": lambda: unet(latents, timestep, text,
                                           cross_attention_kwargs={"moa": MoAInputs(prior_only=True)}),
            "moa_1_subject": with_subjects(1), "moa_2_subject": with_subjects(2)}
    with torch.no_grad():
        for run in runs.values():
            for _ in range(settings["warmup"]):
                run()
        seconds = interleaved_seconds(runs, rounds=settings["steps"] + 2, device=device)
    results = {f"{name}_step_seconds": value for name, value in seconds.items()}
    for name in ("moa_1_subject", "moa_2_subject", "moa_prior_only"):
        results[f"{name}_vs_plain_ratio"] = seconds[name] / seconds["plain"]
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


def _table(results: dict) -> str:
    lines = [f"{'measurement':<58} value", "-" * 72]
    for part, values in results.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    lines.append(f"{part}.{key}.{sub:<40} {v:10.4f}")
            elif isinstance(value, float):
                lines.append(f"{part}.{key:<50} {value:10.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "sample", "data", "embedded", "recipe"], nargs="*")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON to write")
    parser.add_argument("--train-variant", choices=TRAIN_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = _device_settings()
    if args.train_variant:  # the per-variant child process of the CPU training benchmark
        sys.stdout.write(json.dumps(train_step_variant(args.train_variant, settings)) + "\n")  # read by the parent
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(torch.get_num_threads())
    parts = args.only or ["train", "sample", "data", "embedded", "recipe"]
    results = {"command": "python -m moa.bench" + (f" --only {' '.join(parts)}" if args.only else ""),
               "settings": settings, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                  "threads": torch.get_num_threads(),
                                                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    with tempfile.TemporaryDirectory() as work:
        for part in parts:
            start = time.perf_counter()
            if part == "train":
                results["train"] = bench_train(settings)
            elif part == "sample":
                results["sample"] = bench_sample(settings)
            elif part == "data":
                results["data"] = bench_data(settings, Path(work))
            elif part == "recipe":
                results["recipe"] = bench_recipe(settings, Path(work))
            else:
                results["embedded"] = bench_embedded(Path(work))
            log.info("%s done in %.0fs", part, time.perf_counter() - start)
    log.info("results:\n%s", _table(results))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
