"""SynthWorld's report: the claims table (a claim holds only beyond two standard errors), the
per-variant numbers, the judges' calibration, wall times, and the figures."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from moa.files import save_image, write_text
from moa.inference.visualize import image_grid, router_map_figure
from moa.synthworld.judges import IDENTITY_ATTRIBUTES
from moa.synthworld.world import IMAGE_SIZE


def write_figures(out: Path, variant: str, images: dict, subjects, contexts, seeds, vae_scale: int) -> None:
    """Fig. 7's analogue (prior-only row, then the same prompts and seeds with each subject, the
    subject image at the left) and the router maps of one generation."""
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
    save_image(image_grid(rows, labels, min_size=96), out / f"fig7_{variant}.png")
    router = images["router"]
    if router and router["maps"]:
        save_image(router_map_figure(pil(router["image"]), router["maps"], latent_size=(IMAGE_SIZE // vae_scale,) * 2,
                                     title=f"{variant}: {router['caption']}"), out / f"router_maps_{variant}.png")


def accuracy_gap(a: float, n_a: int, b: float, n_b: int) -> tuple[float, float]:
    """a - b in points and its standard error (two independent binomial proportions). Only for results
    written before the per-image readings were recorded (see ``paired_gap``)."""
    error = math.sqrt(a * (1 - a) / max(n_a, 1) + b * (1 - b) / max(n_b, 1))
    return 100 * (a - b), 100 * error


def clustered_mean(values: torch.Tensor, groupings: list[list]) -> tuple[float, float]:
    """Mean of per-image values (n,) and its standard error when the images are not independent draws:
    images that share a label in any of ``groupings`` (each n hashable labels, e.g. the subject, or the
    prompt and seed) may be correlated. The multiway cluster-robust variance of Cameron, Gelbach and
    Miller (2011): inclusion-exclusion over the groupings and their intersections (for two,
    V_a + V_b - V_ab), each V_g = G / (G - 1) * sum over its G clusters of (sum of deviations)^2 / n^2,
    floored at the largest one-way variance so it cannot go negative; nan when a grouping has one
    cluster. One grouping of equal-sized clusters gives the standard error of the cluster means."""
    n, deviations = len(values), (values - values.mean()).tolist()

    def variance(labels) -> float:
        sums: dict = defaultdict(float)
        for label, deviation in zip(labels, deviations):
            sums[label] += deviation
        return len(sums) / (len(sums) - 1) * sum(s * s for s in sums.values()) / n ** 2 if len(sums) > 1 else math.nan

    one_way = [variance(labels) for labels in groupings]
    if any(math.isnan(v) for v in one_way):  # a grouping with one cluster: no error to estimate
        return values.mean().item(), math.nan
    total = sum((-1) ** (size + 1) * variance(list(zip(*subset)))
                for size in range(1, len(groupings) + 1) for subset in itertools.combinations(groupings, size))
    return values.mean().item(), math.sqrt(max(total, *one_way))


def paired_gap(keys: list[tuple], differences: torch.Tensor) -> dict:
    """Mean of per-image differences (n,) between two readings of the same (word, subject, context, seed)
    ``keys`` (two variants, or a variant and the prior's image of that prompt and seed), in points.
    Images of one subject, and of one prompt and seed (same starting noise, and the same prior image),
    are correlated: the standard error is clustered both ways (``clustered_mean``).

    Returns ``gap`` and ``stderr`` (points), ``clusters`` (prompt-seed pairs) and ``subjects``."""
    subjects, prompts = correlation_groups(keys)
    gap, error = clustered_mean(differences, [subjects, prompts])
    return {"gap": 100 * gap, "stderr": 100 * error, "clusters": len(set(prompts)), "subjects": len(set(subjects))}


def correlation_groups(keys: list[tuple]) -> list[list]:
    """The labels (word, subject, context, seed) keys share when their images are correlated: the subject
    (word, i) and the prompt with its seed (word, c, seed)."""
    return [[(w, i) for w, i, _, _ in keys], [(w, c, s) for w, _, c, s in keys]]


def identity_gap(r: dict, other: dict | None = None) -> tuple[float, float]:
    """Identity accuracy of variant numbers ``r`` minus ``other``'s (a variant judged on the same
    images' keys) or, without ``other``, minus the prior's own images judged against the same subjects:
    (points, standard error). Paired and clustered where the per-image readings were recorded; results
    written before that fall back to two independent binomials over the attribute decisions."""
    if other is None:
        if "identity_gap_over_prior" in r:
            return r["identity_gap_over_prior"]["gap"], r["identity_gap_over_prior"]["stderr"]
        return accuracy_gap(r["identity_accuracy"], r["identity_decisions"], r["identity_accuracy_of_prior_images"],
                            r["identity_decisions"])
    if "identity_per_image" in r and "identity_per_image" in other:
        theirs = dict(zip(map(tuple, other["identity_per_image"]["keys"]), other["identity_per_image"]["accuracy"]))
        keys = [tuple(k) for k in r["identity_per_image"]["keys"]]
        differences = torch.tensor(r["identity_per_image"]["accuracy"]) - torch.tensor([theirs[k] for k in keys])
        gap = paired_gap(keys, differences)
        return gap["gap"], gap["stderr"]
    return accuracy_gap(r["identity_accuracy"], r["identity_decisions"], other["identity_accuracy"],
                        other["identity_decisions"])


# The variants every other one is measured against: the swap's and context's baseline, and the ablation
# that pairs with synth_moa only.
BASELINES = ("synth_no_moa", "synth_no_spacetime")


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    """(claim, measured, target, holds) rows of the results table. An accuracy "beats" another only
    by more than two standard errors of the difference; "within 5 points" needs the whole
    two-standard-error interval inside +-5. Every variant that is not a baseline (synth_moa and any
    lever such as synth_moa_influence) gets its own rows; a claim of a variant other than synth_moa
    ends with its name in brackets."""
    variants = results["variants"]
    no_moa, no_st = variants.get("synth_no_moa"), variants.get("synth_no_spacetime")
    rows = []
    for name, moa in variants.items():
        if name not in BASELINES:
            suffix = "" if name == "synth_moa" else f" [{name}]"
            rows += [(claim + suffix, *rest) for claim, *rest in variant_claims(results, moa, no_moa)]
    if no_moa:
        rows.append(context_claim("no_moa", no_moa, judged=False))
    moa = variants.get("synth_moa")
    if moa and no_st:
        gap, error = identity_gap(moa, no_st)
        rows.append(("spacetime ablation: identity accuracy with / without the PE term",
                     f"{100 * moa['identity_accuracy']:.1f}% / {100 * no_st['identity_accuracy']:.1f}% "
                     f"({gap:+.1f} +- {error:.1f} points)", "with > without", _yes(gap > 2 * error)))
    return rows


def variant_claims(results: dict, moa: dict, no_moa: dict | None) -> list[tuple[str, str, str, str]]:
    """The claims of one MoA variant's numbers ``moa``, against synth_no_moa's where given."""
    rows = []
    if no_moa and "swap" in moa and "swap" in no_moa:
        ratio = moa["swap"]["mae_outside"] / max(no_moa["swap"]["mae_outside"], 1e-12)
        rows.append(("disentanglement: swap A->B, mean abs change outside the subject, MoA / no_moa",
                     f"{moa['swap']['mae_outside']:.4f} / {no_moa['swap']['mae_outside']:.4f} = {ratio:.2f}x",
                     "<= 0.5x", _yes(ratio <= 0.5)))
    rows.append(context_claim("MoA", moa, judged=True))
    chance, ceiling = results["chance_identity_accuracy"], identity_ceiling(results)
    accuracy, n = moa["identity_accuracy"], moa["identity_decisions"]
    error = moa.get("identity_stderr", 100 * math.sqrt(accuracy * (1 - accuracy) / max(n, 1)))
    bar = max(2 * chance, 0.7 * ceiling)
    rows.append(("identity: attribute accuracy of held-out subjects injected by MoA",
                 f"{100 * accuracy:.1f}% +- {error:.1f} (uniform chance {100 * chance:.1f}%, VAE ceiling "
                 f"{100 * ceiling:.1f}%)", f">= 2x chance and >= 70% of the ceiling ({100 * bar:.1f}%)",
                 _yes(100 * accuracy - 2 * error >= 100 * bar)))
    gap, error = identity_gap(moa)
    rows.append(("identity: MoA vs the prior's own images judged against the same subjects",
                 f"{100 * accuracy:.1f}% vs {100 * moa['identity_accuracy_of_prior_images']:.1f}% "
                 f"({gap:+.1f} +- {error:.1f} points)", "above", _yes(gap > 2 * error)))
    if "seen_identity_accuracy" in moa:
        rows.append(("injection works at all: identity accuracy of subjects stage 2 trained on",
                     f"{100 * moa['seen_identity_accuracy']:.1f}% (VAE ceiling {100 * ceiling:.1f}%)",
                     "near the ceiling", "-"))
    for split, who in (("test", "held-out"), ("train", "trained-on")):
        information = moa.get("identity_information", {}).get(split)
        if information:
            rows.append((f"injection reaches the model: {who} subjects' pixels, denoising error with their own "
                         "image vs another subject's",
                         f"{information['own']:.4f} vs {information['shuffled']:.4f} (no subject "
                         f"{information['none']:.4f}): {100 * information['gain']:.1f}% lower, "
                         f"+- {100 * information['difference_stderr'] / information['shuffled']:.1f}"
                         + _gain_by_timestep(information) + _gain_by_region(information),
                         "lower (> 2 standard errors)",
                         _yes(information["shuffled"] - information["own"] > 2 * information["difference_stderr"])))
    training = moa.get("training", {})
    if "router_prior_weight_background" in training:
        background, subject = training["router_prior_weight_background"], training["router_prior_weight_foreground"]
        rows.append(("routers separate: mean prior weight over the loss layers, background / subject pixels",
                     f"{background:.3f} / {subject:.3f}", ">= 0.8 / <= 0.5",
                     _yes(background >= 0.8 and subject <= 0.5)))
    return rows


def context_claim(name: str, r: dict, judged: bool) -> tuple[str, str, str, str]:
    """The prior-preservation row of one variant's numbers ``r``; ``judged=False`` for a comparison row.
    Paired: each subject image against the prior's image of the same prompt and seed."""
    gap, error, clusters = (r["context_gap"][k] for k in ("gap", "stderr", "clusters"))
    return (f"prior preservation: context accuracy, {name} vs the prior's own images",
            f"{100 * r['context_accuracy']:.1f}% vs {100 * r['prior_context_accuracy']:.1f}% "
            f"({gap:+.1f} +- {error:.1f} points, paired over {clusters} prompts x seeds)",
            "within 5 points" if judged else "(comparison)", _yes(abs(gap) + 2 * error <= 5) if judged else "-")


def identity_ceiling(results: dict) -> float:
    """Mean identity-attribute accuracy of the judges on the prior VAE's reconstructions of held-out
    scenes: the most a generation decoded by that VAE could score (nan before calibration)."""
    reconstructions = results.get("judges", {}).get("vae_reconstructions", {})
    values = [reconstructions.get(f"attribute/{name}") for name in IDENTITY_ATTRIBUTES]
    return sum(values) / len(values) if all(v is not None for v in values) else float("nan")


def _yes(holds: bool) -> str:
    return "yes" if holds else "**no**"


def _gain_by_timestep(information: dict) -> str:
    """'; by timestep quarter, low noise first: 20 / 15 / 8 / 1%', or '' for results written before it."""
    quarters = information.get("by_timestep")
    if not quarters:
        return ""
    return "; by timestep quarter, low noise first: " + " / ".join(f"{100 * q['gain']:.0f}" for q in quarters) + "%"


def _gain_by_region(information: dict) -> str:
    """'; head / rest of the figure: 12 +- 2 / 40 +- 2%', or '' for results written before it."""
    regions = information.get("by_region")
    if not regions:
        return ""
    return "; head / rest of the figure: " + " / ".join(
        f"{100 * r['gain']:.0f} +- {100 * r['difference_stderr'] / r['shuffled']:.0f}"
        for r in (regions["head"], regions["body"])) + "%"


def write_report(out: Path, results: dict, timings: dict) -> None:
    write_text(out / "results.json", json.dumps({**results, "timings_seconds": timings}, indent=2) + "\n")
    lines = ["# SynthWorld results", "", "| claim | measured | target | holds |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {m} | {t} | {h} |" for c, m, t, h in claims(results)]
    if results["variants"]:  # variants=[]: the report of a prior alone (its gates and the judges)
        lines += variant_section(results)
    nan, sensitivity = float("nan"), results.get("prior_sensitivity", {})
    lines += ["", "Prior's sensitivity to its prompt (mean abs pixel change at the same seed): person word "
              f"man -> woman {sensitivity.get('word_change_mae', nan):.4f}, context -> another context "
              f"{sensitivity.get('context_change_mae', nan):.4f}."]
    lines += stage1_section(results)
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
              "reference image at the left, same prompts and seeds), `router_maps_<variant>.png`, "
              "`router_separation.png` (router prior weight on background and subject pixels over training)."]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    write_router_curves(out / "router_separation.png", results)


def variant_section(results: dict) -> list[str]:
    """Per-variant numbers, the judges' spread and identity accuracy per attribute."""
    lines = ["", "## Per variant", "",
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
    spread = {v: r["spread_judge"] for v, r in results["variants"].items() if "spread_judge" in r}
    if spread:
        lines += ["", "The judges' own spread: the same images read by judges trained with another seed "
                  "(identity / context / prior context accuracy, this judge vs the other):", "",
                  "| variant | identity | context | prior context |", "| --- | --- | --- | --- |"]
        for variant, other in spread.items():
            r = results["variants"][variant]
            lines.append(f"| {variant} | " + " | ".join(
                f"{r[k]:.3f} vs {other[k]:.3f}" for k in ("identity_accuracy", "context_accuracy",
                                                          "prior_context_accuracy")) + " |")
    lines += ["", "Identity accuracy per attribute:", "",
              "| variant | " + " | ".join(next(iter(results["variants"].values()))["identity_accuracy_per_attribute"]) + " |",
              "| --- |" + " --- |" * 5]
    for variant, r in results["variants"].items():
        lines.append(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in r["identity_accuracy_per_attribute"].values()) + " |")
    return lines


def stage1_section(results: dict) -> list[str]:
    """The gates of the models MoA builds on: the image encoder (does it tell subjects apart?) and the
    prior (does it draw the world it is asked for?)."""
    lines = []
    encoder = results.get("image_encoder")
    if encoder:
        probe = encoder["probe_accuracy"]
        lines += ["", "## Stage 1 gates", "",
                  f"Image encoder, linear probe on {encoder['test_subjects']} held-out subjects' embeddings (gate: "
                  ">= 90% each): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in probe.items())
                  + f" ({_yes(min(probe.values()) >= 0.9)}); mean cosine between different subjects "
                  f"{encoder['subject_cosine']:.3f}."]
    gates = results.get("prior_gates")
    if gates:
        lines += ["", f"Prior, its own images ({gates['images']}: contexts x words x seeds) read by the judges:", "",
                  "| gate | measured | target | holds |", "| --- | --- | --- | --- |",
                  f"| context (place, object, colour, holding) | {100 * gates['context_accuracy']:.1f}% ("
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in gates["context_accuracy_per_factor"].items())
                  + f") | >= 90% | {_yes(gates['context_accuracy'] >= 0.9)} |",
                  f"| person word read as prompted | {100 * gates['word_accuracy']:.1f}% | >= 90% | "
                  f"{_yes(gates['word_accuracy'] >= 0.9)} |",
                  f"| segmenter finds a figure | {100 * gates['figure_found']:.1f}% | >= 95% | "
                  f"{_yes(gates['figure_found'] >= 0.95)} |"]
        if "described_identity_accuracy" in gates:
            lines.append(f"| identity attributes of the held-out subjects *named in the prompt*, read back "
                         f"({gates['described_identity_decisions']} decisions) | "
                         f"{100 * gates['described_identity_accuracy']:.1f}% ("
                         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                     gates.get("described_identity_accuracy_per_attribute", {}).items())
                         + f"; chance {100 * results['chance_identity_accuracy']:.1f}%) | (what the text path draws; "
                         "no gate) | - |")
    return lines


def write_router_curves(path: Path, results: dict) -> None:
    """Router prior weight on background (solid) and subject (dashed) pixels over each variant's training."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves = {v: r.get("training", {}).get("curves", {}) for v, r in results["variants"].items()}
    curves = {v: c for v, c in curves.items() if c.get("router_prior_weight_background")}
    if not curves:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, (variant, series) in enumerate(curves.items()):
        colour = f"C{index}"
        for key, style, label in (("router_prior_weight_background", "-", "background"),
                                  ("router_prior_weight_foreground", "--", "subject")):
            steps, values = zip(*series[key])
            axis.plot(steps, values, style, color=colour, label=f"{variant}: {label}")
    axis.axhline(0.8, color="grey", linewidth=0.5)
    axis.axhline(0.5, color="grey", linewidth=0.5)
    axis.set(xlabel="training step", ylabel="router prior weight", ylim=(0, 1),
             title="Routers: background should go to the prior (>= 0.8), the subject not (<= 0.5)")
    axis.title.set_fontsize(8)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
