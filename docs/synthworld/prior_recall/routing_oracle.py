"""Would routers that separate make the swap leave the outside alone? Trained weights, routing replaced at inference.

usage: python docs/synthworld/prior_recall/routing_oracle.py --prior DIR --world DIR --out DIR --contexts N --seeds N \
           [--subjects-per-word N] --no-moa WEIGHTS --weights NAME=WEIGHTS [NAME=WEIGHTS ...] [--modes MODE ...] [--tag TAG]

Disentanglement (swap subject A for B: mean absolute change outside the subject <= 0.5x no_moa's) and the routers'
split (background >= 0.8 prior weight, subject <= 0.5) both fail on the 896-person prior. This asks whether the
first follows from the second: the main protocol's held-out subjects, prompts, seeds, sampler and judges
(``conf/synthworld.yaml``'s ``eval``; CONTEXTS and SEEDS scale it), every MoA weight set generated with its
routers as trained and with their output replaced in every MoA layer by

- ``sharpened``: the learned weights at temperature 0.1 (each pixel all but picks its argmax expert);
- ``background_to_prior``: prior weight 1 outside the figure, the learned weights inside. The figure is not known
  before sampling, so it is the judges' segmentation of the prior's own image of the same prompt and seed
  (MoA keeps the prior's layout), grown by ``MASK_GROWTH`` pixels, area-resized to each layer's resolution;
- ``oracle_split``: the same, and prior weight 0 inside the figure (the split the routers' claim asks for, exactly);
- ``background_to_prior_in_loss_layers`` / ``..._outside_loss_layers``: ``background_to_prior`` in the layer set
  ``L`` of the router loss only (11 of 16 blocks), or only in the 5 blocks it skips (the first 2 and last 3, the
  highest resolution), whose routers no loss supervises.

In ``learned`` mode it also records, per layer, the mean prior weight inside and outside that figure (conditional
half of the guidance batch, every sampling step).

The oracle modes need the prior's images, which a user does not have at the same seed for free: they are a
diagnostic, not an inference option. The swap's change outside is also given per pair, with a bootstrap standard
error of each ratio to no_moa (same pairs, resampled together). Writes OUT_DIR/routing_oracle{TAG}.json and
OUT_DIR/routing_oracle{TAG}.png (one swap pair per mode: subject A, subject B, |A - B| x4) and, with ``learned``
among the modes, OUT_DIR/routing_oracle{TAG}_router_layers.png (the per-layer table as bars).
"""

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torchvision.utils import save_image

from moa.config import CONFIG_DIR, asset
from moa.evaluation.metrics import Disentanglement
from moa.inference.pipeline import MoAPipeline, scheduler_from_name
from moa.models.attention import MoAAttnProcessor
from moa.models.model import MoAModel
from moa.models.unet import loss_layer_names
from moa.synthworld.judges import Judges
from moa.synthworld.measure import dilate, generate_prior, generate_subjects, pick_contexts, pick_subjects, score_variant

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("routing_oracle")

MODES = ("learned", "sharpened", "background_to_prior", "oracle_split", "background_to_prior_in_loss_layers",
         "background_to_prior_outside_loss_layers")
TEMPERATURE = 0.1
MASK_GROWTH = 4  # image pixels (a latent pixel is 8)
BOOTSTRAP = 2000


class RoutingOverride(nn.Module):
    """Wraps the ``Router`` of layer ``name``: the same (batch, pixels, 2) weights, replaced as ``state["mode"]``
    says. ``state["figure"]`` (1, 1, H, W) in [0, 1], 1 on the figure, is shared by every layer of the U-Net;
    ``state["stats"]`` collects {name: [prior weight sum inside, pixels inside, sum outside, pixels outside]}."""

    def __init__(self, router: nn.Module, state: dict, name: str, in_loss_layers: bool):
        super().__init__()
        self.router, self.state, self.name, self.in_loss_layers = router, state, name, in_loss_layers

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.router(hidden_states)
        mode = self.state["mode"]
        if mode == "sharpened":
            return (weights.clamp_min(1e-12).log() / TEMPERATURE).softmax(-1)
        side = math.isqrt(hidden_states.shape[1])  # SynthWorld's latents are square
        figure = F.interpolate(self.state["figure"], size=(side, side), mode="area").flatten(1)[..., None]
        if mode == "learned":
            prior = weights[weights.shape[0] // 2:, :, :1]  # the conditional half of plain guidance
            sums = [(prior * figure).sum(), figure.sum() * len(prior), (prior * (1 - figure)).sum(),
                    (1 - figure).sum() * len(prior)]
            totals = self.state["stats"].setdefault(self.name, [0.0] * 4)
            self.state["stats"][self.name] = [a + b.item() for a, b in zip(totals, sums)]
            return weights
        if mode.endswith("_in_loss_layers") and not self.in_loss_layers \
                or mode.endswith("_outside_loss_layers") and self.in_loss_layers:
            return weights
        inside = torch.zeros_like(weights[..., :1]) if mode == "oracle_split" else weights[..., :1]
        prior = figure * inside + (1 - figure)
        return torch.cat([prior, 1 - prior], dim=-1)


def override_routers(model: MoAModel, state: dict) -> dict[str, int]:
    """Wrap every MoA layer's router; returns {"block": its transformer block index} per layer name."""
    loss_layers = loss_layer_names(model.unet, model.moa_config)
    blocks = {}
    for processor in model.unet.attn_processors.values():
        if isinstance(processor, MoAAttnProcessor) and processor.router is not None:
            processor.router = RoutingOverride(processor.router, state, processor.name, processor.name in loss_layers)
            blocks[processor.name] = {"block": processor.block_index, "in_loss_layers": processor.name in loss_layers}
    return blocks


def swap_changes(images: dict, subjects, judges, dilation: int) -> dict:
    """{(word, i, c, seed): mean |A - B| outside the dilated union of both figures} for subject i vs i + 1."""
    changes = {}
    for (word, i, c, seed), image in images.items():
        other = images[(word, (i + 1) % len(subjects[word]), c, seed)]
        region = dilate(torch.maximum(judges.person_masks(image[None]), judges.person_masks(other[None])), dilation)
        pair = Disentanglement()  # the report's swap metric, one pair at a time for the bootstrap
        pair.update(image[None], other[None], region)
        changes[(word, i, c, seed)] = pair.compute()["mae_outside"]
    return changes


def ratio_with_stderr(changes: dict, baseline: dict, generator: torch.Generator) -> dict:
    keys = sorted(changes)
    a, b = torch.stack([changes[k] for k in keys]), torch.stack([baseline[k] for k in keys])
    draws = torch.randint(len(keys), (BOOTSTRAP, len(keys)), generator=generator)
    ratios = a[draws].mean(1) / b[draws].mean(1)
    return {"ratio": (a.mean() / b.mean()).item(), "stderr": ratios.std().item(), "pairs": len(keys)}


def layer_table(stats: dict, blocks: dict) -> dict:
    """Per layer: block, whether the router loss covers it, mean prior weight inside / outside the figure."""
    return {name: {**blocks[name], "prior_weight_figure": inside / max(pixels_in, 1),
                   "prior_weight_background": outside / max(pixels_out, 1)}
            for name, (inside, pixels_in, outside, pixels_out) in stats.items()}


def plot_router_layers(results: dict, path: Path) -> None:
    """Bar chart of every weight set's learned per-layer prior weight, background and figure, the layers outside
    the router loss's set shaded: what the mean over the loss layers does not show."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tables = {name: runs["learned"]["router_per_layer"] for name, runs in results.items()
              if isinstance(runs, dict) and "router_per_layer" in runs.get("learned", {})}
    figure, axes = plt.subplots(len(tables), 1, figsize=(12, 3.2 * len(tables)), squeeze=False)
    for ax, (name, table) in zip(axes[:, 0], tables.items()):
        layers = sorted(table, key=lambda n: (table[n]["block"], n))
        x = torch.arange(len(layers)).float()
        for i, layer in enumerate(layers):
            if not table[layer]["in_loss_layers"]:
                ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
        ax.bar(x - 0.2, [table[n]["prior_weight_background"] for n in layers], 0.4, label="background")
        ax.bar(x + 0.2, [table[n]["prior_weight_figure"] for n in layers], 0.4, label="figure")
        ax.axhline(0.8, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [f"{table[n]['block']}.{n.rsplit('.', 1)[-1]}" for n in layers], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prior weight")
        ax.set_title(f"{name}: learned routers per layer (block.attn; shaded: not in the router loss's layers)")
        ax.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(prior: str, world: str, out: str, contexts: int, seeds: int, no_moa: str, named: list[str],
         modes: list[str], tag: str, subjects_per_word: int | None = None) -> None:
    overrides = [f"eval.contexts={contexts}", f"eval.seeds={seeds}"]
    if subjects_per_word is not None:
        overrides.append(f"eval.subjects_per_word={subjects_per_word}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="synthworld", overrides=overrides)
    malformed = [item for item in named if "=" not in item]
    if malformed:
        raise ValueError(f"--weights expects NAME=WEIGHTS_FOLDER items, got {malformed}")
    weights = dict(item.split("=", 1) for item in named)
    for option, path in {"--no-moa": no_moa, **{f"--weights {name}": path for name, path in weights.items()}}.items():
        if not (Path(path) / "moa.safetensors").is_file():
            raise FileNotFoundError(f"{option}: no moa.safetensors in {path}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = pick_subjects(Path(world), cfg.eval.subjects_per_word)
    context_list = pick_contexts(cfg.eval.contexts, cfg.seed)
    seed_list = list(range(cfg.eval.seeds))
    judges = Judges.load(asset("synth-judges"))

    def pipeline(moa_weights):
        model = MoAModel.from_pretrained(prior, asset("synth-clip"), moa_weights=moa_weights)
        pipe = MoAPipeline.from_moa_model(model, scheduler_from_name(cfg.eval.scheduler, model.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return model, pipe

    with torch.no_grad():
        _, pipe = pipeline(None)
        prior_images = generate_prior(pipe, list(subjects), context_list, seed_list, cfg)
        figures = {k: dilate(judges.person_masks(v[None]), MASK_GROWTH) for k, v in prior_images.items()}
        state = {"mode": "learned"}

        def set_figure(key):  # the prior image's figure of this (word, c, seed), for the oracle modes
            state["figure"] = figures[key]

        _, pipe = pipeline(no_moa)
        baseline_images, _ = generate_subjects(pipe, subjects, context_list, seed_list, cfg, set_figure)
        baseline = swap_changes(baseline_images, subjects, judges, cfg.eval.region_dilation)
        results = {"protocol": {"contexts": contexts, "seeds": seeds, "subjects_per_word": cfg.eval.subjects_per_word,
                                "temperature": TEMPERATURE,
                                "mask_growth": MASK_GROWTH, "bootstrap": BOOTSTRAP},
                   "no_moa": {"swap_mae_outside": torch.stack(list(baseline.values())).mean().item()}}
        shown, key = [], sorted(baseline_images)[0]
        other = (key[0], (key[1] + 1) % len(subjects[key[0]]), *key[2:])
        shown.append(("no_moa", baseline_images[key], baseline_images[other]))
        for name, path in weights.items():
            model, pipe = pipeline(path)
            blocks = override_routers(model, state)
            log.info("%s: %d routers overridden", name, len(blocks))
            results[name] = {}
            for mode in modes:
                state["mode"], state["stats"] = mode, {}
                images, _ = generate_subjects(pipe, subjects, context_list, seed_list, cfg, set_figure)
                scores = score_variant({"subject": images, "prior": prior_images}, subjects, context_list, judges, cfg)
                changes = swap_changes(images, subjects, judges, cfg.eval.region_dilation)
                results[name][mode] = {
                    "identity_accuracy": scores["identity_accuracy"],
                    **{k: scores[k] for k in ("identity_decisions", "identity_stderr", "identity_per_image")},
                    "context_gap": scores["context_gap"],
                    "swap_mae_outside": torch.stack(list(changes.values())).mean().item(),
                    "swap_vs_no_moa": ratio_with_stderr(changes, baseline, torch.Generator().manual_seed(0)),
                    "versus_prior_mae_outside": scores["versus_prior"]["mae_outside"]}
                log.info("%s %s: %s", name, mode, json.dumps(results[name][mode]))
                if state["stats"]:
                    results[name][mode]["router_per_layer"] = layer_table(state["stats"], blocks)
                shown.append((f"{name} {mode}", images[key], images[other]))
    (out_dir / f"routing_oracle{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = [torch.stack([a, b, ((a - b).abs() * 4).clamp(0, 1)]) for _, a, b in shown]
    save_image(F.interpolate(torch.cat(rows), scale_factor=2, mode="nearest"), out_dir / f"routing_oracle{tag}.png", nrow=3, padding=2, pad_value=1.0)
    if "learned" in modes:
        plot_router_layers(results, out_dir / f"routing_oracle{tag}_router_layers.png")
    log.info("rows of routing_oracle%s.png: %s", tag, [label for label, _, _ in shown])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prior", required=True, help="the prior (a diffusers folder)")
    parser.add_argument("--world", required=True, help="the SynthWorld data the subjects come from")
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", type=int, required=True)
    parser.add_argument("--seeds", type=int, required=True)
    parser.add_argument("--subjects-per-word", type=int, default=None,
                        help="held-out subjects per person word (default: the protocol's); the first ones of the "
                             "test split, so a larger number keeps the smaller one's subjects")
    parser.add_argument("--no-moa", required=True, help="synth_no_moa's moa_weights folder: the swap's baseline")
    parser.add_argument("--weights", nargs="+", action="extend", required=True, metavar="NAME=WEIGHTS",
                        help="one or more; the flag may repeat")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args()
    main(args.prior, args.world, args.out, args.contexts, args.seeds, args.no_moa, args.weights, args.modes, args.tag,
         args.subjects_per_word)
