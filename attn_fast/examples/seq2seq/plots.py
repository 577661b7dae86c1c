"""Alignment heatmaps: the attention weights of every decoded step over the source characters, as Figure 3 of
Bahdanau et al. (2014)."""
from __future__ import annotations

import os

import torch

from attn_fast.examples.figures import missing_glyphs_ignored, plain_text, save_figure

__all__ = ["HEATMAP_MAX_SOURCE_LENGTH", "alignment_heatmap"]

#: Longest source a heatmap is drawn for, in characters. One labelled column per character stops being readable
#: well before this, and the attention kept for a heatmap is [2 S + 10, S] per source (decoding's default
#: max_len), so this also bounds that history: at most 410 x 200 floats, 0.3 MiB a source.
HEATMAP_MAX_SOURCE_LENGTH = 200
# Side of one cell, in inches, and the most a whole figure may take along either axis: a figure of 410 rows of
# 0.32 in would be 16k pixels tall at 120 dpi (a 0.5 GB canvas); beyond the cap the cells shrink instead.
_CELL_INCHES = 0.32
_MAX_FIGURE_INCHES = 30.0
_DPI = 120


def alignment_heatmap(source: str, output: str, weights: torch.Tensor, path: str | os.PathLike, *,
                      title: str | None = None) -> None:
    """Save a heatmap of `weights` [len(output) (+1 for EOS), len(source)] (rows: output characters, columns:
    source characters; darker = more attention) to `path` (PNG, SVG or PDF by extension), atomically.

    Sources of up to HEATMAP_MAX_SOURCE_LENGTH characters (ValueError beyond). Text is drawn literally ("$" is no
    mathtext, bytes of invalid UTF-8 show as U+FFFD); cells shrink below 0.32 in when the figure would exceed
    30 in along an axis."""
    if len(source) > HEATMAP_MAX_SOURCE_LENGTH:
        raise ValueError(f"a heatmap shows sources of at most {HEATMAP_MAX_SOURCE_LENGTH} characters, got "
                         f"{len(source)}")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [plain_text(c) for c in output] + ["</s>"]
    columns = [plain_text(c) if c != " " else "␣" for c in source]
    weights = weights.detach().float().cpu()[: len(rows), : len(source)]
    cell = min(_CELL_INCHES, _MAX_FIGURE_INCHES / max(len(columns), weights.shape[0], 1))
    font_size = min(10.0, 0.8 * 72 * cell)  # points: labels no taller than their cell
    figure, axes = plt.subplots(figsize=(cell * len(columns) + 1.5, cell * weights.shape[0] + 1.2))
    try:
        axes.imshow(weights.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, aspect="equal")
        axes.set_xticks(range(len(columns)), columns, fontsize=font_size)
        axes.set_yticks(range(weights.shape[0]), rows[: weights.shape[0]], fontsize=font_size)
        axes.xaxis.tick_top()
        axes.set_xlabel("source")
        axes.set_ylabel("output")
        if title:
            axes.set_title(plain_text(title), pad=24)
        with missing_glyphs_ignored():
            figure.tight_layout()
            save_figure(figure, path, dpi=_DPI)
    finally:
        plt.close(figure)
