"""Pictures people would rather look at than read: sample grids and router maps."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from moa.models.inputs import pixel_map_to_grid  # noqa: E402


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, *, pad: int = 2,
               min_size: int = 128) -> Image.Image:
    """Rows of equally sized images in one picture, each row optionally labelled at its left; small
    images are enlarged (nearest neighbour) to at least ``min_size`` pixels so they can be seen."""
    width, height = rows[0][0].size
    scale = max(1, -(-min_size // min(width, height)))
    width, height = width * scale, height * scale
    label_width = 90 if labels else 0
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (width + pad), len(rows) * (height + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((width, height), Image.NEAREST), (label_width + c * (width + pad), r * (height + pad)))
        if labels:
            draw.text((2, r * (height + pad) + height // 2 - 5), labels[r], fill="black")
    return grid


def router_map_figure(router_maps: dict[str, torch.Tensor], *, latent_size: tuple[int, int], image_index: int = 0,
                      max_columns: int = 8, title: str = "") -> Image.Image:
    """The paper's Fig. 6/19: prior weight ``R0`` per layer (rows) over denoising steps (columns).

    router_maps: layer name -> (steps, batch, pixels). Dark = personalized expert, light = prior.
    """
    return layer_map_figure(router_maps, latent_size=latent_size, image_index=image_index, max_columns=max_columns,
                            title=title, normalise=False)


def subject_attention_figure(attention_maps: dict[str, torch.Tensor], *, subject: int, latent_size: tuple[int, int],
                             image_index: int = 0, max_columns: int = 8, title: str = "") -> Image.Image:
    """The personalized experts' cross-attention at one subject's token, per layer over steps.

    attention_maps: cross-attention layer name -> (steps, batch, pixels, subjects).
    """
    maps = {name: value[..., subject] for name, value in attention_maps.items()}
    return layer_map_figure(maps, latent_size=latent_size, image_index=image_index, max_columns=max_columns,
                            title=title, normalise=True)


def layer_map_figure(maps: dict[str, torch.Tensor], *, latent_size: tuple[int, int], image_index: int,
                     max_columns: int, title: str, normalise: bool) -> Image.Image:
    """Per-layer maps (rows) over denoising steps (columns); maps: name -> (steps, batch, pixels).
    ``normalise`` scales each map to its own range (attention), else the colour scale is [0, 1]."""
    names = list(maps)
    steps = maps[names[0]].shape[0]
    shown = sorted({round(i * (steps - 1) / max(1, max_columns - 1)) for i in range(min(steps, max_columns))})
    fig, axes = plt.subplots(len(names), len(shown), figsize=(1.1 * len(shown) + 2.5, 1.1 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, step in enumerate(shown):
            grid = pixel_map_to_grid(maps[name][step, image_index: image_index + 1], *latent_size)[0, 0]
            ax = axes[r][c]
            limits = {} if normalise else {"vmin": 0.0, "vmax": 1.0}
            ax.imshow(grid.numpy(), cmap="viridis", **limits)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {step}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name.replace("transformer_blocks.0.", "").replace("attentions", "att"), fontsize=5,
                              rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
