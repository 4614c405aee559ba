"""SynthWorld's measurements: held-out subjects and contexts, generation with every variant from the
same prompts and seeds, and the judges' readings of identity, context and disentanglement."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from omegaconf import DictConfig
from tqdm import tqdm

from moa.data.datamodule import FFHQWildDataModule
from moa.data.stores import FolderStore
from moa.data.transforms import SubjectImageSpec
from moa.evaluation.metrics import Disentanglement
from moa.inference.pipeline import MoAPipeline, Subject, scheduler_from_name
from moa.models.losses import denoising_target, latent_union_mask
from moa.models.model import MoAModel, load_image_encoder
from moa.synthworld.judges import ATTRIBUTES, CONTEXT, IDENTITY_ATTRIBUTES, WorldLabels, square_crop
from moa.synthworld.report import clustered_mean, correlation_groups, paired_gap, write_figures
from moa.synthworld.world import (
    IMAGE_SIZE,
    WORDS,
    ReferenceRenders,
    compose_caption,
    identity_details,
    observable,
    subject_crops,
)

log = logging.getLogger(__name__)


@dataclass
class EvalSubject:
    """One identity to personalize with: its reference render (the subject image) and its attributes."""

    image_id: str
    word: str
    reference: Path
    reference_mask: Path
    attributes: list[int]  # class indices, order of moa.synthworld.judges.ATTRIBUTES

    @property
    def identity(self) -> dict[str, str]:
        """The attributes by name, as in the world's annotations."""
        return {name: classes[index] for (name, classes), index in zip(ATTRIBUTES.items(), self.attributes)}


def pick_subjects(world: Path, per_word: int, split: str = "test") -> dict[str, list[EvalSubject]]:
    """The first ``per_word`` single-person scenes of each word in one split of the world: "test" for
    held-out identities, "train" for identities stage 2 trained on (does injection work at all?)."""
    store = FolderStore(world)
    subjects: dict[str, list[EvalSubject]] = {word: [] for word in WORDS}
    for image_id in store.split(split):
        annotation = json.loads(store.read(image_id, "json"))
        if len(annotation["identities"]) != 1:
            continue
        identity = annotation["identities"][0]
        if len(subjects[identity["word"]]) < per_word:
            reference = next(s["reference"] for s in annotation["segments"] if s.get("reference"))
            folder = world / image_id[:5]
            subjects[identity["word"]].append(EvalSubject(
                image_id, identity["word"], folder / f"{reference}.jpg", folder / f"{reference}.npy",
                [ATTRIBUTES[name].index(identity[name]) for name in ATTRIBUTES]))
    short = {word: len(found) for word, found in subjects.items() if len(found) < per_word}
    if short:
        raise ValueError(f"eval.subjects_per_word={per_word}: the {split} split of {world} has only {short} "
                         "single-person scenes; lower it or render a larger world (scale.world_samples)")
    return subjects


def pick_contexts(count: int, seed: int) -> list[dict]:
    """``count`` distinct contexts (place, object, colour, holding), drawn reproducibly."""
    every = [dict(zip(CONTEXT, values)) for values in itertools.product(*CONTEXT.values())]
    return random.Random(seed).sample(every, count)


def dilate(masks, pixels: int):
    """Grow (n, 1, H, W) {0, 1} masks by ``pixels`` in every direction."""
    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels) if pixels else masks


def _generate(pipe, prompts: list[str], subject_lists, seed: int, cfg, record: bool = False):
    """One batch, every image from its own generator seeded with ``seed`` (so a prompt's prior-only
    and personalized images share their starting noise) -> ((n, 3, H, W) in [0, 1], router maps)."""
    generators = [torch.Generator().manual_seed(seed) for _ in prompts]
    output = pipe(prompts, subject_lists, num_inference_steps=cfg.eval.num_inference_steps,
                  guidance_scale=cfg.eval.guidance_scale, subject_guidance_scale=cfg.eval.subject_guidance_scale,
                  generator=generators, output_type="pt",
                  record_router_maps=record)
    return output.images.float().cpu(), output.router_maps


def generate_prior(pipe, words, contexts, seeds, cfg) -> dict:
    """The prior's own image of every (word, context, seed) prompt: {(word, c, seed): (3, H, W)}."""
    return {(word, c, seed): _generate(pipe, [compose_caption([word], contexts[c])[0]], None, seed, cfg)[0][0]
            for word in words for c in range(len(contexts)) for seed in seeds}


def generate_subjects(pipe, subjects, contexts, seeds, cfg, before_batch=None) -> tuple[dict, dict]:
    """Every subject of each word in every (context, seed) prompt: ({(word, i, c, seed): (3, H, W)},
    the router maps and caption of the first batch). ``before_batch((word, c, seed))``, when given, runs
    before each batch (a diagnostic that changes the model per prompt hooks in there)."""
    images, router = {}, {}
    jobs = [(word, c, seed) for word in subjects for c in range(len(contexts)) for seed in seeds]
    for word, c, seed in tqdm(jobs, desc="generating", leave=False):
        if before_batch is not None:
            before_batch((word, c, seed))
        caption, _ = compose_caption([word], contexts[c])
        people = subjects[word]
        subject_lists = [[Subject(s.reference, word, mask=_load_mask(s.reference_mask))] for s in people]
        batch, maps = _generate(pipe, [caption] * len(people), subject_lists, seed, cfg, record=not router)
        if not router:
            router = {"maps": maps, "caption": caption, "image": batch[0]}
        for i, image in enumerate(batch):
            images[(word, i, c, seed)] = image
    return images, router


def generate_described(pipe, subjects, contexts, seeds, cfg) -> dict:
    """The prior's own images of prompts that *name* each subject's identity ("a man with tan skin, ...
    shirt next to ..."), no subject image: {(word, i, c, seed): (3, H, W)}. What the text path alone
    draws: a prior that cannot draw a named attribute gives the personalized experts, copied from its
    cross-attention, no route to draw it either."""
    images = {}
    for word, people in subjects.items():
        for c, seed in itertools.product(range(len(contexts)), seeds):
            captions = [compose_caption([word], contexts[c], [identity_details(s.identity)])[0] for s in people]
            for i, image in enumerate(_generate(pipe, captions, None, seed, cfg)[0]):
                images[(word, i, c, seed)] = image
    return images


def _load_mask(path: Path):
    return np.load(path) > 0


def identity_hits(judges, keyed_images: dict, subject_of) -> torch.Tensor:
    """Which identity attributes the judges read correctly: {key: (3, H, W)} -> (n, 5) {0, 1}, in the
    order of ``IDENTITY_ATTRIBUTES``; ``subject_of(key)`` is the ``EvalSubject`` whose identity counts."""
    identity_columns = [list(ATTRIBUTES).index(name) for name in IDENTITY_ATTRIBUTES]
    keys = list(keyed_images)
    read = judges.read_subject(torch.stack([keyed_images[k] for k in keys]))
    truth = torch.tensor([subject_of(k).attributes for k in keys])
    return (read[:, identity_columns] == truth[:, identity_columns]).float()


def paired_context_gap(subject_keys: list, subject_hits: torch.Tensor, prior_keys: list,
                       prior_hits: torch.Tensor) -> dict:
    """Context accuracy of the subject images minus the prior's own image of the same prompt and seed,
    paired: subject_keys (word, i, c, seed) with subject_hits (n, 4), prior_keys (word, c, seed) with
    prior_hits (m, 4). The images are not independent draws (every subject image of one (word, c, seed)
    shares that prior image and its starting noise; one subject's images share its reference), so the
    standard error is ``paired_gap``'s, clustered both ways, not a binomial count."""
    prior_row = dict(zip(prior_keys, prior_hits.mean(1)))
    differences = subject_hits.mean(1) - torch.stack([prior_row[(w, c, s)] for w, _, c, s in subject_keys])
    return paired_gap(subject_keys, differences)


def score_variant(images: dict, subjects, contexts, judges, cfg) -> dict:
    """Identity, context and disentanglement of one variant's images, judged. images: {"subject":
    generate_subjects' images, "prior": generate_prior's}."""
    context_truth = torch.tensor([[list(CONTEXT[k]).index(v) for k, v in context.items()] for context in contexts])

    def context_hits(keyed_images: dict, context_of) -> torch.Tensor:
        keys = list(keyed_images)
        read = judges.read_context(torch.stack([keyed_images[k] for k in keys]))
        return (read == context_truth[[context_of(k) for k in keys]]).float()  # (n, 4)

    subject_hits = identity_hits(judges, images["subject"], lambda k: subjects[k[0]][k[1]])
    # The prior's own images judged against each subject: the accuracy that needs no subject at all.
    prior_as_subject = {(w, i, c, s): images["prior"][(w, c, s)] for (w, i, c, s) in images["subject"]}
    prior_hits = identity_hits(judges, prior_as_subject, lambda k: subjects[k[0]][k[1]])
    keys = list(images["subject"])
    identity, prior_identity = subject_hits.mean(1), prior_hits.mean(1)  # per image, (n,)
    subject_context_hits = context_hits(images["subject"], lambda k: k[2])
    prior_context_hits = context_hits(images["prior"], lambda k: k[1])
    results = {
        "identity_accuracy": subject_hits.mean().item(),
        "identity_accuracy_per_attribute": dict(zip(IDENTITY_ATTRIBUTES, subject_hits.mean(0).tolist())),
        "identity_accuracy_of_prior_images": prior_hits.mean().item(),
        # Clustered by subject and by prompt-seed (``clustered_mean``), in points; the per-image readings
        # let another variant judged on the same keys be compared pairwise (``report.identity_gap``).
        "identity_stderr": 100 * clustered_mean(identity, correlation_groups(keys))[1],
        "identity_gap_over_prior": paired_gap(keys, identity - prior_identity),
        "identity_per_image": {"keys": [list(k) for k in keys], "accuracy": identity.tolist()},
        "context_accuracy": subject_context_hits.mean().item(),
        "context_accuracy_per_factor": dict(zip(CONTEXT, subject_context_hits.mean(0).tolist())),
        "prior_context_accuracy": prior_context_hits.mean().item(),
        "context_gap": paired_context_gap(keys, subject_context_hits, list(images["prior"]), prior_context_hits),
        # attribute decisions behind identity_accuracy (n images x 5)
        "identity_decisions": subject_hits.numel(),
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
    return sum(1 / len(ATTRIBUTES[name]) for name in IDENTITY_ATTRIBUTES) / len(IDENTITY_ATTRIBUTES)


def judge_calibration(judges, world: Path, prior: str) -> dict:
    """The judges on held-out renders, and on the prior VAE's reconstructions of the same scenes (people
    re-cut from the reconstructions at their true masks): the most any generation decoded by that VAE
    could score."""
    test = WorldLabels(world, "test")
    renders = judges.accuracy_on(test)
    vae = AutoencoderKL.from_pretrained(prior, subfolder="vae").eval()
    with torch.no_grad():
        test.scenes = (vae.decode(vae.encode(test.scenes * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    crop_index = [c for c, _, _ in test.scene_people]
    test.crops = torch.stack([square_crop(test.scenes[s], mask) for _, s, mask in test.scene_people])
    test.attributes = test.attributes[crop_index]
    return {"renders": renders, "vae_reconstructions": judges.accuracy_on(test)}


def prior_gates(pipe, judges, cfg, subjects) -> dict:
    """Does the prior draw the world? Its own images of ``cfg.eval.prior_gate_contexts`` contexts x both
    words x ``cfg.eval.seeds`` seeds, read by the judges: context accuracy, the person word read as
    prompted, and whether the segmenter finds a figure at all; and the identity attributes of
    ``subjects`` read back from prompts that name them (``generate_described``)."""
    contexts = pick_contexts(cfg.eval.prior_gate_contexts, cfg.seed + 1)
    images = generate_prior(pipe, list(WORDS), contexts, list(range(cfg.eval.seeds)), cfg)
    keys = list(images)
    batch = torch.stack([images[k] for k in keys])
    context_truth = torch.tensor([[list(CONTEXT[f]).index(contexts[c][f]) for f in CONTEXT] for _, c, _ in keys])
    context_hits = (judges.read_context(batch) == context_truth).float()
    word_read = judges.read_subject(batch)[:, list(ATTRIBUTES).index("word")]
    word_truth = torch.tensor([WORDS.index(word) for word, _, _ in keys])
    described = generate_described(pipe, subjects, contexts[:cfg.eval.contexts], list(range(cfg.eval.seeds)), cfg)
    described_hits = identity_hits(judges, described, lambda k: subjects[k[0]][k[1]])
    return {"described_identity_accuracy": described_hits.mean().item(),
            "described_identity_accuracy_per_attribute": dict(zip(IDENTITY_ATTRIBUTES, described_hits.mean(0).tolist())),
            "described_identity_decisions": described_hits.numel(),
            "context_accuracy": context_hits.mean().item(),
            "context_accuracy_per_factor": dict(zip(CONTEXT, context_hits.mean(0).tolist())),
            "word_accuracy": (word_read == word_truth).float().mean().item(),
            "figure_found": (judges.person_masks(batch).flatten(1).amax(1) > 0).float().mean().item(),
            "images": len(keys)}


def evaluate_variants(cfg: DictConfig, out: Path, world: Path, prior: str, image_encoder: str, weights: dict[str, Path],
                      judges, spread_judges=None) -> dict:
    """Generate and judge every variant; write figures and return the results. ``spread_judges``
    (judges trained with another seed), when given, read the same images again: the judges' own spread."""
    subjects = pick_subjects(world, cfg.eval.subjects_per_word)
    seen_subjects = pick_subjects(world, cfg.eval.subjects_per_word, split="train")
    contexts = pick_contexts(cfg.eval.contexts, cfg.seed)
    seeds = list(range(cfg.eval.seeds))
    results = {"chance_identity_accuracy": chance_identity_accuracy(), "variants": {},
               "protocol": {"subjects": {w: [s.image_id for s in people] for w, people in subjects.items()},
                            "contexts": contexts, "seeds": seeds, "num_inference_steps": cfg.eval.num_inference_steps,
                            "guidance_scale": cfg.eval.guidance_scale,
                            "subject_guidance_scale": cfg.eval.subject_guidance_scale, "scheduler": cfg.eval.scheduler}}

    def pipeline(moa_weights: Path | None) -> tuple[MoAModel, MoAPipeline]:
        model = MoAModel.from_pretrained(prior, image_encoder, moa_weights=moa_weights)
        pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(cfg.eval.scheduler, model.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return model, pipe

    # Without subjects every variant is the prior, exactly: its images and gates come from the
    # untrained MoA model once (so ``variants=[]`` measures a prior alone).
    _, pipe = pipeline(None)
    prior_images = generate_prior(pipe, list(subjects), contexts, seeds, cfg)
    results["prior_sensitivity"] = prior_sensitivity(prior_images)
    results["prior_gates"] = prior_gates(pipe, judges, cfg, subjects)
    for variant, moa_weights in weights.items():
        model, pipe = pipeline(moa_weights)
        subject_images, router = generate_subjects(pipe, subjects, contexts, seeds, cfg)
        images = {"subject": subject_images, "prior": prior_images, "router": router}
        # The same prompts with identities stage 2 trained on (their own reference renders): if these
        # do not come out, nothing reaches the image at all.
        seen_images, _ = generate_subjects(pipe, seen_subjects, contexts, seeds, cfg)
        seen_hits = identity_hits(judges, seen_images, lambda k: seen_subjects[k[0]][k[1]])
        information = {split: identity_information_gain(model, world, prior, image_encoder, split=split, seed=cfg.seed)
                       for split in ("test", "train")}
        results["variants"][variant] = {**score_variant(images, subjects, contexts, judges, cfg),
                                        "seen_identity_accuracy": seen_hits.mean().item(),
                                        "seen_identity_decisions": seen_hits.numel(),
                                        "identity_information": information,
                                        "training": training_summary(Path(moa_weights).parent)}
        if spread_judges is not None:
            again = score_variant(images, subjects, contexts, spread_judges, cfg)
            results["variants"][variant]["spread_judge"] = {
                k: again[k] for k in ("identity_accuracy", "context_accuracy", "prior_context_accuracy")}
        write_figures(out, variant, images, subjects, contexts, seeds, pipe.vae_scale_factor)
        log.info("%s: %s", variant, json.dumps(results["variants"][variant]))
    return results


@torch.no_grad()
def identity_information_gain(model: MoAModel, world: Path, prior: str, image_encoder: str, *, split: str,
                              samples: int = 256, draws: int = 2, seed: int = 0) -> dict:
    """Does the trained model use the subject image at all? Judge-free and prior-free: its denoising
    error on the subjects' latent pixels (mask-weighted MSE, as the masked loss) with each sample's own
    subject image, with the image of the next sample in the batch (another subject), and with no
    subject (the personalized expert sees the plain text). Same latents, noise and timesteps for all
    three; ``draws`` noise/timestep draws per sample, seeded.

    Returns the three mean errors, ``gain`` = (shuffled - own) / shuffled (the share of the subject
    pixels' error the right identity removes; 0 = the image is ignored), the standard error of
    shuffled - own over the paired per-sample differences, and ``by_timestep``: the same numbers for each
    quarter of the training timesteps, low noise first (where sampling would decide an attribute the
    subject image does not reach, the gain of that quarter stays near 0), and ``by_region``: the same
    numbers on the subjects' head pixels (inside ``face_bbox``: face and hair) and on the rest of the
    figure (an image path that carries the shirt but not the head's colours gains on "body" only).
    """
    data = FFHQWildDataModule(root=str(world), base_model=prior, image_encoder=image_encoder, resolution=IMAGE_SIZE,
                              batch_size=16, num_workers=0, seed=seed, subject_source=ReferenceRenders(),
                              val_split=split, val_samples=samples, face_regions=True)
    errors, drawn_timesteps = defaultdict(lambda: defaultdict(list)), []  # region -> condition -> (b,) errors
    for index, batch in enumerate(data.val_dataloader()):
        subject_features = model.encode_subjects(batch["subject_pixel_values"])
        another = torch.roll(torch.arange(len(subject_features)), 1)
        conditions = {"own": (subject_features, batch["subject_valid"]),
                      "shuffled": (subject_features[another], batch["subject_valid"]),
                      "none": (subject_features, torch.zeros_like(batch["subject_valid"]))}
        batch_errors, timesteps = subject_denoising_errors(
            model, batch, conditions, torch.Generator().manual_seed(seed * 100_003 + index), draws)
        drawn_timesteps.append(timesteps)
        for region, by_condition in batch_errors.items():
            for name, values in by_condition.items():
                errors[region][name].append(values)
    errors = {region: {name: torch.cat(values) for name, values in by_name.items()} for region, by_name in errors.items()}
    num_train_timesteps = model.noise_scheduler.config.num_train_timesteps
    quarter_of = torch.cat(drawn_timesteps) * 4 // num_train_timesteps  # 0 = lowest noise
    by_timestep = [{"timesteps": [q * num_train_timesteps // 4, (q + 1) * num_train_timesteps // 4],
                    **_paired_gain({name: values[quarter_of == q] for name, values in errors["subject"].items()})}
                   for q in range(4) if (quarter_of == q).any()]
    return {**_paired_gain(errors["subject"]), "by_timestep": by_timestep,
            "by_region": {region: _paired_gain(errors[region]) for region in ("head", "body")}}


def subject_denoising_errors(model: MoAModel, batch: dict, conditions: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             generator: torch.Generator, draws: int) -> tuple[dict, torch.Tensor]:
    """The denoising error of one batch's subject pixels under each subject condition, on the same
    latents, noise and timesteps (``draws`` draws from ``generator``).

    conditions: name -> (subject features as ``model.encode_subjects`` gives them, (b, S) validity).
    Returns {region ("subject", "head", "body", ``region_weights``): {name: (b * draws,) errors}} (the
    mask-weighted MSE, as the masked loss) and the (b * draws,) timesteps drawn.
    """
    text = model.encode_text(batch["input_ids"])
    posterior = model.vae.encode(batch["pixel_values"]).latent_dist  # once per batch; each draw samples it
    weights = region_weights(batch["subject_masks"], batch["subject_face_masks"], posterior.mean.shape[-2:])
    errors, drawn_timesteps = defaultdict(lambda: defaultdict(list)), []
    for _ in range(draws):
        latents = posterior.sample(generator) * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(model.noise_scheduler, latents, noise, timesteps)
        drawn_timesteps.append(timesteps)
        for name, (features, valid) in conditions.items():
            moa = model.moa_inputs(text, timesteps=timesteps, subject_features=features,
                                   subject_token_index=batch["subject_token_index"], subject_valid=valid)
            prediction = model.unet(noisy, timesteps, text, cross_attention_kwargs={"moa": moa}).sample
            squared = ((prediction - target) ** 2).mean(1, keepdim=True)
            for region, weight in weights.items():
                errors[region][name].append((squared * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1e-6))
    return ({region: {name: torch.cat(values) for name, values in by_name.items()} for region, by_name in errors.items()},
            torch.cat(drawn_timesteps))


def region_weights(subject_masks: torch.Tensor, face_masks: torch.Tensor, size: tuple[int, int]) -> dict:
    """Subject masks and their face parts (batch, subjects, H, W) -> latent pixel weights (batch, 1, h, w)
    of the "subject" (all figures), its "head" pixels and the rest of the figure ("body"). A face mask
    lies inside its figure's mask, and the union and the antialiased resize keep that order, so head +
    body = subject, pixel for pixel."""
    subject = latent_union_mask(subject_masks, size)
    head = latent_union_mask(face_masks, size)
    return {"subject": subject, "head": head, "body": (subject - head).clamp(min=0)}


def _paired_gain(errors: dict) -> dict:
    """{"own", "shuffled", "none": (n,) per-sample errors} -> their means, the gain and its standard error."""
    difference = errors["shuffled"] - errors["own"]
    return {**{name: values.mean().item() for name, values in errors.items()},
            "gain": (difference.mean() / errors["shuffled"].mean()).item(),
            "difference_stderr": (difference.std() / len(difference) ** 0.5).item(), "pairs": len(difference)}


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
    """From a stage-2 run's CSV log: means over the last ``last`` training steps of the loss and of the
    router's mean prior weight on background and subject pixels (is the router learning to separate
    them?), and those router weights at every logged step (``curves``: key -> [(step, value)])."""
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("train/loss")]
    summary, curves = {}, {}
    final_step = max((int(r["step"]) for r in rows), default=0)
    for key in ("train/loss", "train/router_prior_weight_background", "train/router_prior_weight_foreground"):
        values = [float(r[key]) for r in rows if r.get(key) and int(r["step"]) > final_step - last]
        if values:
            summary[key.removeprefix("train/")] = sum(values) / len(values)
        if "router" in key:
            curves[key.removeprefix("train/")] = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return summary | {"curves": curves}


def probe_attributes(train: torch.Tensor, train_ids: list[dict], test: torch.Tensor, test_ids: list[dict], *,
                     steps: int = 500, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear probe per identity attribute: trained on ``train`` (n, dim) features
    of the ``train_ids`` identities (standardised with the train statistics), read on ``test``'s, on the
    subjects where the attribute is visible (no hair colour for the bald)."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    accuracy = {}
    generator = torch.Generator().manual_seed(seed)
    for name, classes in ATTRIBUTES.items():
        seen = torch.tensor([observable(name, i) for i in train_ids])
        seen_test = torch.tensor([observable(name, i) for i in test_ids])
        labels = torch.tensor([classes.index(i[name]) for i in train_ids])[seen]
        probe = torch.nn.Linear(train.shape[1], len(classes))
        with torch.no_grad():
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
            probe.bias.zero_()
        optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(probe((train[seen] - mean) / std), labels).backward()
            optimizer.step()
        with torch.no_grad():
            predicted = probe((test[seen_test] - mean) / std).argmax(-1)
        truth = torch.tensor([classes.index(i[name]) for i in test_ids])[seen_test]
        accuracy[name] = (predicted == truth).float().mean().item()
    return accuracy


def probe_image_encoder(encoder: str, world: Path, *, steps: int = 500, seed: int = 0) -> dict:
    """How much identity the image encoder's embeddings carry, on held-out subjects.

    A linear probe per attribute (``probe_attributes``), trained on the L2-normalised ``image_embeds`` of
    the train split's reference renders and read on the test split's (subjects the encoder never saw),
    and the mean cosine between the embeddings of different test subjects (near 1: every subject looks
    alike).
    """
    spec = SubjectImageSpec.from_pretrained(encoder)
    model = load_image_encoder(encoder).eval()

    def embed(split: str) -> tuple[torch.Tensor, list[dict]]:
        pixels, identities = subject_crops(world, split, spec, sources=("reference",))
        with torch.no_grad():
            return F.normalize(model(pixel_values=pixels).image_embeds, dim=-1), identities

    (train, train_ids), (test, test_ids) = embed("train"), embed("test")
    accuracy = probe_attributes(train, train_ids, test, test_ids, steps=steps, seed=seed)
    cosine = test @ test.T
    off_diagonal = cosine[~torch.eye(len(test), dtype=torch.bool)]
    return {"probe_accuracy": accuracy, "subject_cosine": off_diagonal.mean().item(),
            "train_subjects": len(train), "test_subjects": len(test)}
