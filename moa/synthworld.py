"""SynthWorld end to end: ``python -m moa.synthworld`` (config ``conf/synthworld.yaml``).

1. the world: scenes, masks, captions and reference renders (``moa.data.synthetic``);
2. stage 1: the tiny VAE and prior (``experiment=synth_vae``, ``synth_prior``), or the committed prior;
3. stage 2: MoA and its ablations on that frozen prior (``experiment=synth_moa`` ...);
4. the judges (``moa.judges``), trained on the world's renders;
5. evaluation: the same prompts and seeds for every variant, prior-only included, scored by the judges.

Stages 2 and 3 are ``train.py`` runs in subprocesses, exactly the commands a user would type (they are
logged); a finished stage is skipped and an interrupted one resumes, so re-running the command resumes
the reproduction. Writes ``results.md``, ``results.json``, ``timings.json`` and figures into ``out``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

import moa.resolvers  # noqa: F401  (config resolvers)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64


class Timings:
    """Wall time per stage, kept in ``timings.json`` across resumed runs (a skipped stage keeps the
    time it took when it ran)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(seconds, 1)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")


def run_stage(stage: str, overrides: list[str], done: Path, timings: Timings) -> None:
    """``python train.py <overrides>`` unless ``done`` exists; its output goes to the stage's log."""
    if done.exists():
        log.info("stage %s: already done (%s)", stage, done)
        return
    command = [sys.executable, str(REPO_ROOT / "train.py"), *overrides]
    log.info("stage %s: %s", stage, " ".join(command[1:]))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0 or not done.exists():
        raise RuntimeError(f"stage {stage} failed (exit {result.returncode}); its last output:\n{result.stderr[-3000:]}")
    timings.record(stage, time.perf_counter() - start)
    log.info("stage %s: done in %.0f s", stage, timings.seconds[stage])


def train_models(cfg: DictConfig, out: Path, world: Path, timings: Timings) -> tuple[str, str, dict[str, Path]]:
    """Stages 1 and 2; returns (prior folder, image encoder folder, variant -> exported MoA weights)."""
    scale = cfg.scale
    cache = out / "cache"
    common = [f"paths.cache_dir={cache}", f"embedded.data_root={world}", f"embedded.num_samples={scale.world_samples}",
              f"embedded.image_size={IMAGE_SIZE}", f"data.num_workers={scale.num_workers}", f"seed={cfg.seed}",
              "logger=csv"]
    if cfg.prior == "train":
        common_stage1 = [*common, f"data.batch_size={scale.stage1_batch_size}"]
        run_stage("stage1_vae", [*common_stage1, "experiment=synth_vae", f"hydra.run.dir={out}/stage1_vae",
                                 f"trainer.max_steps={scale.vae_steps}", f"export_dir={out}/vae"],
                  out / "vae" / "model_index.json", timings)
        run_stage("stage1_prior", [*common_stage1, "experiment=synth_prior", f"hydra.run.dir={out}/stage1_prior",
                                   f"base_model={out}/vae", f"trainer.max_steps={scale.prior_steps}",
                                   f"export_dir={out}/prior"],
                  out / "prior" / "model_index.json", timings)
        prior = str(out / "prior")
    else:
        from moa.resolvers import asset

        prior = asset("synth-prior")
    weights = {}
    for variant in cfg.variants:
        run_dir = out / variant
        run_stage(variant, [*common, f"experiment={variant}", f"hydra.run.dir={run_dir}", f"base_model={prior}",
                            f"data.batch_size={scale.stage2_batch_size}", f"trainer.max_steps={scale.stage2_steps}"],
                  run_dir / "moa_weights" / "moa.safetensors", timings)
        weights[variant] = run_dir / "moa_weights"
    return prior, str(cache / "tiny-components" / "clip"), weights


# ---- evaluation ------------------------------------------------------------------------------------


@dataclass
class TestSubject:
    """One held-out identity: its reference render (the subject image) and its attributes."""

    image_id: str
    word: str
    reference: Path
    reference_mask: Path
    attributes: list[int]  # class indices, order of moa.judges.ATTRIBUTES


def test_subjects(world: Path, per_word: int) -> dict[str, list[TestSubject]]:
    """The first ``per_word`` single-person scenes of each word in the world's test split."""
    from moa.data.ffhq import FolderStore
    from moa.data.synthetic import WORDS
    from moa.judges import ATTRIBUTES

    store = FolderStore(world)
    subjects: dict[str, list[TestSubject]] = {word: [] for word in WORDS}
    for image_id in store.split("test"):
        annotation = json.loads(store.read(image_id, "json"))
        if len(annotation["identities"]) != 1:
            continue
        identity = annotation["identities"][0]
        if len(subjects[identity["word"]]) < per_word:
            reference = next(s["reference"] for s in annotation["segments"] if s.get("reference"))
            folder = world / image_id[:5]
            subjects[identity["word"]].append(TestSubject(
                image_id, identity["word"], folder / f"{reference}.jpg", folder / f"{reference}.npy",
                [ATTRIBUTES[name].index(identity[name]) for name in ATTRIBUTES]))
    short = {word: len(found) for word, found in subjects.items() if len(found) < per_word}
    if short:
        raise ValueError(f"eval.subjects_per_word={per_word}: the test split of {world} has only {short} "
                         "single-person scenes; lower it or render a larger world (scale.world_samples)")
    return subjects


def test_contexts(count: int, seed: int) -> list[dict]:
    """``count`` distinct contexts (place, object, colour, holding), drawn reproducibly."""
    from moa.judges import CONTEXT

    every = [dict(zip(CONTEXT, values)) for values in itertools.product(*CONTEXT.values())]
    return random.Random(seed).sample(every, count)


def dilate(masks, pixels: int):
    """Grow (n, 1, H, W) {0, 1} masks by ``pixels`` in every direction."""
    import torch.nn.functional as F

    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels) if pixels else masks


def _generate(pipe, prompts: list[str], subject_lists, seed: int, cfg, record: bool = False):
    """One batch, every image from its own generator seeded with ``seed`` (so a prompt's prior-only
    and personalized images share their starting noise) -> ((n, 3, H, W) in [0, 1], router maps)."""
    import torch

    generators = [torch.Generator().manual_seed(seed) for _ in prompts]
    output = pipe(prompts, subject_lists, num_inference_steps=cfg.eval.num_inference_steps,
                  guidance_scale=cfg.eval.guidance_scale, generator=generators, output_type="pt",
                  record_router_maps=record)
    return output.images.float().cpu(), output.router_maps


def generate_prior(pipe, words, contexts, seeds, cfg) -> dict:
    """The prior's own image of every (word, context, seed) prompt: {(word, c, seed): (3, H, W)}."""
    from moa.data.synthetic import compose_caption

    return {(word, c, seed): _generate(pipe, [compose_caption([word], contexts[c])[0]], None, seed, cfg)[0][0]
            for word in words for c in range(len(contexts)) for seed in seeds}


def generate_subjects(pipe, subjects, contexts, seeds, cfg) -> tuple[dict, dict]:
    """Every subject of each word in every (context, seed) prompt: ({(word, i, c, seed): (3, H, W)},
    the router maps and caption of the first batch)."""
    from tqdm import tqdm

    from moa.data.synthetic import compose_caption
    from moa.pipeline import Subject

    images, router = {}, {}
    jobs = [(word, c, seed) for word in subjects for c in range(len(contexts)) for seed in seeds]
    for word, c, seed in tqdm(jobs, desc="generating", leave=False):
        caption, _ = compose_caption([word], contexts[c])
        people = subjects[word]
        subject_lists = [[Subject(s.reference, word, mask=_load_mask(s.reference_mask))] for s in people]
        batch, maps = _generate(pipe, [caption] * len(people), subject_lists, seed, cfg, record=not router)
        if not router:
            router = {"maps": maps, "caption": caption}
        for i, image in enumerate(batch):
            images[(word, i, c, seed)] = image
    return images, router


def _load_mask(path: Path):
    import numpy as np

    return np.load(path) > 0


def score_variant(images: dict, subjects, contexts, judges, cfg) -> dict:
    """Identity, context and disentanglement of one variant's images, judged. images: {"subject":
    generate_subjects' images, "prior": generate_prior's}."""
    import torch

    from moa.judges import ATTRIBUTES, CONTEXT, IDENTITY_ATTRIBUTES
    from moa.metrics import Disentanglement

    identity_columns = [list(ATTRIBUTES).index(name) for name in IDENTITY_ATTRIBUTES]
    context_truth = torch.tensor([[list(CONTEXT[k]).index(v) for k, v in context.items()] for context in contexts])

    def identity_hits(keyed_images: dict, subject_of) -> torch.Tensor:
        keys = list(keyed_images)
        batch = torch.stack([keyed_images[k] for k in keys])
        read = judges.read_subject(batch)
        truth = torch.tensor([subject_of(k).attributes for k in keys])
        return (read[:, identity_columns] == truth[:, identity_columns]).float()  # (n, 5)

    def context_hits(keyed_images: dict, context_of) -> torch.Tensor:
        keys = list(keyed_images)
        read = judges.read_context(torch.stack([keyed_images[k] for k in keys]))
        return (read == context_truth[[context_of(k) for k in keys]]).float()  # (n, 4)

    subject_hits = identity_hits(images["subject"], lambda k: subjects[k[0]][k[1]])
    # The prior's own images judged against each subject: the accuracy that needs no subject at all.
    prior_as_subject = {(w, i, c, s): images["prior"][(w, c, s)] for (w, i, c, s) in images["subject"]}
    prior_hits = identity_hits(prior_as_subject, lambda k: subjects[k[0]][k[1]])
    subject_context_hits = context_hits(images["subject"], lambda k: k[2])
    results = {
        "identity_accuracy": subject_hits.mean().item(),
        "identity_accuracy_per_attribute": dict(zip(IDENTITY_ATTRIBUTES, subject_hits.mean(0).tolist())),
        "identity_accuracy_of_prior_images": prior_hits.mean().item(),
        "context_accuracy": subject_context_hits.mean().item(),
        "context_accuracy_per_factor": dict(zip(CONTEXT, subject_context_hits.mean(0).tolist())),
        "prior_context_accuracy": context_hits(images["prior"], lambda k: k[1]).mean().item(),
        # judged decisions behind each accuracy, for its standard error
        "identity_decisions": subject_hits.numel(),
        "context_decisions": len(images["subject"]) * len(CONTEXT),
        "prior_context_decisions": len(images["prior"]) * len(CONTEXT),
    }

    # Swap subject i for subject i+1 (same word, prompt and seed), and subject vs prior-only.
    swap, versus_prior = Disentanglement(), Disentanglement()
    for (word, i, c, seed), image in images["subject"].items():
        count = len(subjects[word])
        prior = images["prior"][(word, c, seed)]
        if count > 1:
            other = images["subject"][(word, (i + 1) % count, c, seed)]
            region = dilate(torch.maximum(judges.person_masks(image[None]), judges.person_masks(other[None])),
                            cfg.eval.region_dilation)
            swap.update(image[None], other[None], region)
        region = dilate(torch.maximum(judges.person_masks(image[None]), judges.person_masks(prior[None])),
                        cfg.eval.region_dilation)
        versus_prior.update(image[None], prior[None], region)
    if any(len(people) > 1 for people in subjects.values()):
        results["swap"] = {k: v.item() for k, v in swap.compute().items()}
    results["versus_prior"] = {k: v.item() for k, v in versus_prior.compute().items()}
    return results


def chance_identity_accuracy() -> float:
    """Mean over the five identity attributes of 1 / number of classes (uniform guessing)."""
    from moa.judges import ATTRIBUTES, IDENTITY_ATTRIBUTES

    return sum(1 / len(ATTRIBUTES[name]) for name in IDENTITY_ATTRIBUTES) / len(IDENTITY_ATTRIBUTES)


def judge_calibration(judges, world: Path, prior: str) -> dict:
    """The judges on held-out renders, and on the prior VAE's reconstructions of the same scenes (people
    re-cut from the reconstructions at their true masks): the most any generation decoded by that VAE
    could score."""
    import torch
    from diffusers import AutoencoderKL

    from moa.judges import WorldLabels, square_crop

    test = WorldLabels(world, "test")
    renders = judges.accuracy_on(test)
    vae = AutoencoderKL.from_pretrained(prior, subfolder="vae").eval()
    with torch.no_grad():
        test.scenes = (vae.decode(vae.encode(test.scenes * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    crop_index = [c for c, _, _ in test.scene_people]
    test.crops = torch.stack([square_crop(test.scenes[s], mask) for _, s, mask in test.scene_people])
    test.attributes = test.attributes[crop_index]
    return {"renders": renders, "vae_reconstructions": judges.accuracy_on(test)}


def evaluate(cfg: DictConfig, out: Path, world: Path, prior: str, image_encoder: str, weights: dict[str, Path],
             judges) -> dict:
    """Generate and judge every variant; write figures and return the results."""
    from moa.model import MoAModel
    from moa.pipeline import MoAPipeline, scheduler_from_name

    subjects = test_subjects(world, cfg.eval.subjects_per_word)
    contexts = test_contexts(cfg.eval.contexts, cfg.seed)
    seeds = list(range(cfg.eval.seeds))
    results = {"chance_identity_accuracy": chance_identity_accuracy(), "variants": {},
               "protocol": {"subjects": {w: [s.image_id for s in people] for w, people in subjects.items()},
                            "contexts": contexts, "seeds": seeds, "num_inference_steps": cfg.eval.num_inference_steps,
                            "guidance_scale": cfg.eval.guidance_scale, "scheduler": cfg.eval.scheduler}}
    prior_images = None
    for variant, moa_weights in weights.items():
        model = MoAModel.from_pretrained(prior, image_encoder, moa_weights=moa_weights)
        pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(cfg.eval.scheduler, model.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        if prior_images is None:  # without subjects every variant is the same prior, exactly
            prior_images = generate_prior(pipe, list(subjects), contexts, seeds, cfg)
            results["prior_sensitivity"] = prior_sensitivity(prior_images)
        subject_images, router = generate_subjects(pipe, subjects, contexts, seeds, cfg)
        images = {"subject": subject_images, "prior": prior_images, "router": router}
        results["variants"][variant] = {**score_variant(images, subjects, contexts, judges, cfg),
                                        "training": training_summary(Path(moa_weights).parent)}
        write_figures(out, variant, images, subjects, contexts, seeds, pipe.vae_scale_factor)
        log.info("%s: %s", variant, json.dumps(results["variants"][variant]))
    return results


def prior_sensitivity(prior_images: dict) -> dict:
    """How much the prior's image changes (mean abs pixel difference, same seed) when the prompt's
    person word changes ("man" -> "woman") and when its context changes. A prior that ignores the
    word gives the personalized experts, copied from it, no path from the subject's token to the image.

    prior_images: {(word, context index, seed): (3, H, W)} as from ``generate_prior``.
    """
    words = sorted({word for word, _, _ in prior_images})
    contexts = sorted({c for _, c, _ in prior_images})
    word_pairs, context_pairs = [], []
    for word, c, seed in prior_images:
        if len(words) > 1 and word == words[0]:
            word_pairs.append(((word, c, seed), (words[1], c, seed)))
        if len(contexts) > 1:
            context_pairs.append(((word, c, seed), (word, contexts[(contexts.index(c) + 1) % len(contexts)], seed)))

    def mean_change(pairs) -> float:
        changes = [(prior_images[a] - prior_images[b]).abs().mean().item() for a, b in pairs]
        return sum(changes) / len(changes) if changes else float("nan")

    return {"word_change_mae": mean_change(word_pairs), "context_change_mae": mean_change(context_pairs)}


def training_summary(run_dir: Path, last: int = 50) -> dict:
    """Means over the last ``last`` logged steps of a stage-2 run's CSV log: loss and the router's mean
    prior weight on background and subject pixels (is the router learning to separate them?)."""
    import csv

    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("train/loss")]
    summary = {}
    for key in ("train/loss", "train/router_prior_weight_background", "train/router_prior_weight_foreground"):
        values = [float(r[key]) for r in rows[-last:] if r.get(key)]
        if values:
            summary[key.removeprefix("train/")] = sum(values) / len(values)
    return summary


def write_figures(out: Path, variant: str, images: dict, subjects, contexts, seeds, vae_scale: int) -> None:
    """Fig. 7's analogue (prior-only row, then the same prompts and seeds with each subject, the
    subject image at the left) and the router maps of one generation."""
    from PIL import Image

    from moa.visualize import image_grid, router_map_figure

    def pil(tensor):
        return Image.fromarray((tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    rows, labels = [], []
    for word, people in subjects.items():
        columns = [(c, s) for c in range(len(contexts)) for s in seeds]
        rows.append([blank] + [pil(images["prior"][(word, c, s)]) for c, s in columns])
        labels.append(f"prior ({word})")
        for i, person in enumerate(people):
            reference = Image.open(person.reference).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
            rows.append([reference] + [pil(images["subject"][(word, i, c, s)]) for c, s in columns])
            labels.append(f"{word} {person.image_id}")
    image_grid(rows, labels, min_size=96).save(out / f"fig7_{variant}.png")
    router = images["router"]
    if router and router["maps"]:
        router_map_figure(router["maps"], latent_size=(IMAGE_SIZE // vae_scale,) * 2,
                          title=f"{variant}: {router['caption']}").save(out / f"router_maps_{variant}.png")


# ---- report ------------------------------------------------------------------------------------------


def accuracy_gap(a: float, n_a: int, b: float, n_b: int) -> tuple[float, float]:
    """a - b in points and its standard error (two independent binomial proportions)."""
    error = math.sqrt(a * (1 - a) / max(n_a, 1) + b * (1 - b) / max(n_b, 1))
    return 100 * (a - b), 100 * error


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    """(claim, measured, target, holds) rows of the results table. An accuracy "beats" another only
    by more than two standard errors of the difference; "within 5 points" needs the whole
    two-standard-error interval inside +-5."""
    variants = results["variants"]
    rows = []
    moa, no_moa, no_st = (variants.get(k) for k in ("synth_moa", "synth_no_moa", "synth_no_spacetime"))
    if moa and no_moa and "swap" in moa and "swap" in no_moa:
        ratio = moa["swap"]["mae_outside"] / max(no_moa["swap"]["mae_outside"], 1e-12)
        rows.append(("disentanglement: swap A->B, mean abs change outside the subject, MoA / no_moa",
                     f"{moa['swap']['mae_outside']:.4f} / {no_moa['swap']['mae_outside']:.4f} = {ratio:.2f}x",
                     "<= 0.5x", _yes(ratio <= 0.5)))
    for name, r in (("MoA", moa), ("no_moa", no_moa)):
        if r:
            gap, error = accuracy_gap(r["context_accuracy"], r["context_decisions"], r["prior_context_accuracy"],
                                      r["prior_context_decisions"])
            rows.append((f"prior preservation: context accuracy, {name} vs the prior's own images",
                         f"{100 * r['context_accuracy']:.1f}% vs {100 * r['prior_context_accuracy']:.1f}% "
                         f"({gap:+.1f} +- {error:.1f} points)", "within 5 points" if name == "MoA" else "(comparison)",
                         _yes(abs(gap) + 2 * error <= 5) if name == "MoA" else "-"))
    if moa:
        gap, error = accuracy_gap(moa["identity_accuracy"], moa["identity_decisions"],
                                  moa["identity_accuracy_of_prior_images"], moa["identity_decisions"])
        rows.append(("identity: attribute accuracy of the injected subject (MoA)",
                     f"{100 * moa['identity_accuracy']:.1f}% vs the prior's own images "
                     f"{100 * moa['identity_accuracy_of_prior_images']:.1f}% ({gap:+.1f} +- {error:.1f} points; "
                     f"uniform chance {100 * results['chance_identity_accuracy']:.1f}%)",
                     "above the prior's images", _yes(gap > 2 * error)))
    if moa and no_st:
        gap, error = accuracy_gap(moa["identity_accuracy"], moa["identity_decisions"], no_st["identity_accuracy"],
                                  no_st["identity_decisions"])
        rows.append(("spacetime ablation: identity accuracy with / without the PE term",
                     f"{100 * moa['identity_accuracy']:.1f}% / {100 * no_st['identity_accuracy']:.1f}% "
                     f"({gap:+.1f} +- {error:.1f} points)", "with > without", _yes(gap > 2 * error)))
    return rows


def _yes(holds: bool) -> str:
    return "yes" if holds else "**no**"


def write_report(out: Path, results: dict, timings: dict) -> None:
    (out / "results.json").write_text(json.dumps({**results, "timings_seconds": timings}, indent=2) + "\n")
    lines = ["# SynthWorld results", "", "| claim | measured | target | holds |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {m} | {t} | {h} |" for c, m, t, h in claims(results)]
    lines += ["", "## Per variant", "",
              "| variant | identity acc. | identity acc. of prior images | context acc. | prior context acc. | "
              "swap: MAE outside / inside | vs prior-only: MAE outside / inside | router prior weight: "
              "background / subject (end of training) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for variant, r in results["variants"].items():
        swap, training = r.get("swap", {}), r.get("training", {})
        lines.append(f"| {variant} | {r['identity_accuracy']:.3f} | {r['identity_accuracy_of_prior_images']:.3f} | "
                     f"{r['context_accuracy']:.3f} | {r['prior_context_accuracy']:.3f} | "
                     f"{swap.get('mae_outside', nan):.4f} / {swap.get('mae_inside', nan):.4f} | "
                     f"{r['versus_prior']['mae_outside']:.4f} / {r['versus_prior']['mae_inside']:.4f} | "
                     f"{training.get('router_prior_weight_background', nan):.3f} / "
                     f"{training.get('router_prior_weight_foreground', nan):.3f} |")
    sensitivity = results.get("prior_sensitivity", {})
    lines += ["", "Prior's sensitivity to its prompt (mean abs pixel change at the same seed): person word "
              f"man -> woman {sensitivity.get('word_change_mae', nan):.4f}, context -> another context "
              f"{sensitivity.get('context_change_mae', nan):.4f}."]
    lines += ["", "Identity accuracy per attribute:", "",
              "| variant | " + " | ".join(next(iter(results["variants"].values()))["identity_accuracy_per_attribute"]) + " |",
              "| --- |" + " --- |" * 5]
    for variant, r in results["variants"].items():
        lines.append(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in r["identity_accuracy_per_attribute"].values()) + " |")
    calibration = results["judges"]
    lines += ["", "## Judges on the world's test split", "",
              "Renders: the scenes (context, segmenter) and every person cut from a scene or from their reference "
              "render (attributes). VAE reconstructions: the same scenes through the prior's VAE, people re-cut "
              "from them at their true masks: the best a generation decoded by that VAE could score.", "",
              "| judge | renders | VAE reconstructions |", "| --- | --- | --- |"]
    for key, value in calibration["renders"].items():
        through = calibration["vae_reconstructions"].get(key)
        lines.append(f"| {key} | {value:.3f} | {'' if through is None else f'{through:.3f}'} |")
    stages = {k: v for k, v in timings.items() if k != "this_invocation"}
    lines += ["", "## Wall time (seconds)", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stages.items()]
    lines += [f"| **all stages** | **{sum(stages.values()):.0f}** ({sum(stages.values()) / 60:.1f} min) |"]
    lines += ["", "Figures: `fig7_<variant>.png` (first row per word: prior-only; then each test subject, its "
              "reference image at the left, same prompts and seeds), `router_maps_<variant>.png`."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def check_config(cfg: DictConfig) -> None:
    """Fail on a bad choice before any stage runs."""
    if cfg.prior not in ("train", "committed"):
        raise ValueError(f"prior={cfg.prior!r}: expected 'train' or 'committed'")
    experiments = REPO_ROOT / "conf" / "experiment"
    unknown = [v for v in cfg.variants if not (experiments / f"{v}.yaml").exists()]
    if unknown:
        raise ValueError(f"variants: {unknown} are not experiments in {experiments}")


def reproduce(cfg: DictConfig) -> dict:
    """Everything, in order; returns the results written to ``results.json``."""
    from moa.data.synthetic import write_synthetic_ffhq

    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    start = time.perf_counter()
    world = out / "world"
    if not (world / "image_ids.txt").exists():
        write_synthetic_ffhq(world, num_samples=cfg.scale.world_samples, size=IMAGE_SIZE, seed=cfg.seed)
        timings.record("world", time.perf_counter() - start)
    prior, image_encoder, weights = train_models(cfg, out, world, timings)

    from moa.judges import Judges, train_judges

    judges_dir = out / "judges"
    if (judges_dir / "judges.safetensors").exists():
        judges = Judges.load(judges_dir)
    else:
        stage_start = time.perf_counter()
        judges = train_judges(world, judges_dir, max_steps=cfg.scale.judge_steps, seed=cfg.seed)
        timings.record("judges", time.perf_counter() - stage_start)
    stage_start = time.perf_counter()
    results = evaluate(cfg, out, world, prior, image_encoder, weights, judges)
    results["judges"] = judge_calibration(judges, world, prior)
    timings.record("evaluation", time.perf_counter() - stage_start)
    timings.record("this_invocation", time.perf_counter() - start)
    write_report(out, results, timings.seconds)
    log.info("results in %s", out / "results.md")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthworld")
def main(cfg: DictConfig) -> None:
    reproduce(cfg)


if __name__ == "__main__":
    main()
