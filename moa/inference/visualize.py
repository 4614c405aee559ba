"""Pictures people would rather look at than read: sample grids, and router / attention maps laid over
the images they belong to (the one routine the training callback, generation and SynthWorld use)."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from moa.models.inputs import pixel_map_to_grid  # noqa: E402


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, *, pad: int = 2,
               min_size: int = 128) -> Image.Image:
    """Rows of equally sized images in one picture, each row optionally labelled at its left (the full
    label, wrapped); small images are enlarged (nearest neighbour) to at least ``min_size`` pixels."""
    width, height = rows[0][0].size
    scale = max(1, -(-min_size // min(width, height)))
    width, height = width * scale, height * scale
    label_width = 150 if labels else 0
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (width + pad), len(rows) * (height + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((width, height), Image.NEAREST), (label_width + c * (width + pad), r * (height + pad)))
        if labels:
            lines = textwrap.wrap(labels[r], width=24)[: max(1, height // 12)]
            top = r * (height + pad) + max(0, height // 2 - 6 * len(lines))
            draw.multiline_text((2, top), "\n".join(lines), fill="black", spacing=2)
    return grid


def router_map_figure(image: Image.Image, router_maps: dict[str, torch.Tensor], *, latent_size: tuple[int, int],
                      image_index: int = 0, layers: list[str] | None = None, max_rows: int = 8, max_columns: int = 6,
                      title: str = "") -> Image.Image:
    """The paper's Fig. 6: each layer's prior weight ``R0`` laid translucently over the generated image,
    layers in rows (``layers``, or ``max_rows`` spread from the first to the last), denoising steps in
    columns, on one colour scale: 0 = the personalized expert, 1 = the prior.

    image: the decoded image the maps belong to; router_maps: layer name -> (steps, batch, pixels).
    """
    return overlay_figure(image, router_maps, latent_size=latent_size, image_index=image_index, layers=layers,
                          max_rows=max_rows, max_columns=max_columns, title=title, scale_label="prior weight R0")


def subject_attention_figure(image: Image.Image, attention_maps: dict[str, torch.Tensor], *, subject: int,
                             latent_size: tuple[int, int], image_index: int = 0, layers: list[str] | None = None,
                             max_rows: int = 8, max_columns: int = 6, title: str = "") -> Image.Image:
    """The personalized experts' cross-attention at one subject's token over the generated image, per
    layer over steps; each map scaled to its own maximum (attention mass spreads over many tokens).

    attention_maps: cross-attention layer name -> (steps, batch, pixels, subjects).
    """
    maps = {name: value[..., subject] for name, value in attention_maps.items()}
    return overlay_figure(image, maps, latent_size=latent_size, image_index=image_index, layers=layers,
                          max_rows=max_rows, max_columns=max_columns, title=title,
                          scale_label="attention / its maximum", normalise=True)


def _spread(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over ``range(count)``, first and last included."""
    shown = min(count, limit)
    return sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})


def overlay_figure(image: Image.Image, maps: dict[str, torch.Tensor], *, latent_size: tuple[int, int],
                   image_index: int, layers: list[str] | None, max_rows: int, max_columns: int, title: str,
                   scale_label: str, normalise: bool = False) -> Image.Image:
    """Per-layer maps (rows) over denoising steps (columns), each upsampled to the image and laid over
    it at half opacity, with one colour bar. maps: name -> (steps, batch, pixels)."""
    names = list(layers) if layers is not None else [list(maps)[i] for i in _spread(len(maps), max_rows)]
    unknown = [n for n in names if n not in maps]
    if unknown:
        raise KeyError(f"no maps recorded for layers {unknown} (recorded: {len(maps)} layers)")
    steps = maps[names[0]].shape[0]
    shown = _spread(steps, max_columns)
    background = image.convert("RGB")
    size = background.size[::-1]  # (H, W)
    fig, axes = plt.subplots(len(names), len(shown), figsize=(1.4 * len(shown) + 3.2, 1.4 * len(names) + 0.6),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, step in enumerate(shown):
            grid = pixel_map_to_grid(maps[name][step, image_index: image_index + 1].float(), *latent_size)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
            if normalise:
                grid = grid / grid.max().clamp(min=1e-8)
            ax = axes[r][c]
            ax.imshow(background)
            mappable = ax.imshow(grid.numpy(), cmap="coolwarm", vmin=0.0, vmax=1.0, alpha=0.55)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {step + 1}/{steps}", fontsize=7)
            if c == 0:
                label = name.replace(".transformer_blocks.0", "").replace("attentions", "att").replace(".processor", "")
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.colorbar(mappable, ax=axes, fraction=0.025, pad=0.02, label=scale_label)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
