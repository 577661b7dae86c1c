"""Per-word attention overlays, as the figures of Show, Attend and Tell: the image, then one panel per emitted
word showing where the decoder looked when it emitted that word."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from attn_fast.examples.figures import plain_text, save_figure


def upsample_attention(weights: torch.Tensor, image_size: int, *, smooth: bool = True) -> torch.Tensor:
    """weights [..., grid²] -> [..., image_size, image_size]: bilinear (smooth, for display) or each cell's
    weight over its whole cell (`smooth=False`, as the grounding score counts it)."""
    grid = math.isqrt(weights.shape[-1])
    if grid * grid != weights.shape[-1]:
        raise ValueError(f"the last dimension must be a square number of grid cells, got {weights.shape[-1]}")
    maps = weights.detach().float().cpu().reshape(-1, 1, grid, grid)
    mode = {"mode": "bilinear", "align_corners": False} if smooth else {"mode": "nearest"}
    return F.interpolate(maps, size=(image_size, image_size), **mode).reshape(*weights.shape[:-1], image_size,
                                                                              image_size)


def attention_overlay(image: torch.Tensor, words: Sequence[str], attention: torch.Tensor,
                      path: str | os.PathLike, *, title: str | None = None, columns: int = 6) -> None:
    """Save a grid of panels to `path` (PNG, SVG or PDF by extension, atomically): the image [3, H, W] (0..1),
    then for each word the image whitened where the attention of its step, attention [≥ len(words), grid²], is
    high (each map scaled to its own maximum, bilinearly upsampled), the word as the panel's title."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    image = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # [H, W, 3]
    maps = upsample_attention(attention[: len(words)], image.shape[0])  # [n, H, W]
    panels = 1 + len(words)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.15 * rows + (0.4 if title else 0)),
                                squeeze=False)
    try:
        for axis in axes.flat:
            axis.axis("off")
        axes.flat[0].imshow(image.numpy(), interpolation="nearest")
        axes.flat[0].set_title("image", fontsize=10)
        for number, (word, attention_map) in enumerate(zip(words, maps), start=1):
            glow = 0.75 * (attention_map / attention_map.max().clamp(min=1e-12))[:, :, None]
            axes.flat[number].imshow((image * (1 - glow) + glow).numpy(), interpolation="nearest")
            axes.flat[number].set_title(plain_text(word), fontsize=10)
        if title:
            figure.suptitle(plain_text(title), fontsize=11)
        figure.tight_layout()
        save_figure(figure, path, dpi=100)
    finally:
        plt.close(figure)
