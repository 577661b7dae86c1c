"""Alignment heatmaps: the attention weights of every decoded step over the source characters, as Figure 3 of
Bahdanau et al. (2014)."""
from __future__ import annotations

import os

import torch


def alignment_heatmap(source: str, output: str, weights: torch.Tensor, path: str | os.PathLike, *,
                      title: str | None = None) -> None:
    """Save a heatmap of `weights` [len(output) (+1 for EOS), len(source)] (rows: output characters, columns:
    source characters; darker = more attention) to `path` (PNG, SVG or PDF by extension)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = list(output) + ["</s>"]
    weights = weights.detach().float().cpu()[: len(rows), : len(source)]
    figure, axes = plt.subplots(figsize=(0.32 * len(source) + 1.5, 0.32 * len(rows) + 1.2))
    axes.imshow(weights.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, aspect="equal")
    axes.set_xticks(range(len(source)), [c if c != " " else "␣" for c in source])
    axes.set_yticks(range(weights.shape[0]), rows[: weights.shape[0]])
    axes.xaxis.tick_top()
    axes.set_xlabel("source")
    axes.set_ylabel("output")
    if title:
        axes.set_title(title, pad=24)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
