"""The attention-grounding score of Show, Attend and Tell-style attention on the generated scenes (the text metrics,
exact match and BLEU, are the examples' shared ones: `attn_fast.examples.metrics`).

Grounding. The annotation grid has `grid`² cells; cell l covers rows [s·(l // grid), +s) and columns
[s·(l % grid), +s) of the image, s = image_size / grid (the encoder's stride). A weight α_l is spread uniformly
over its cell, so the attention mass inside a bounding box is Σ_l α_l · |cell_l ∩ box| / |cell_l|. For each
emitted shape word ("circle", "square", "triangle") whose preceding word is a colour, the shape it names is the
scene's shape of that (colour, kind) — colours are distinct within a scene, so there is at most one; when there
is none (the caption named a shape that is not there) the word is counted as unmatched and left out. The score
of the word is the mass inside that shape's bounding box of the attention of the step that emitted it; the
chance level is the mass uniform attention would put there, box area / image area. Both are averaged over all
matched shape words of the test set.

The same score for colour words (`words="colours"`): a colour names its shape alone (one shape per colour), so
every emitted colour word of a colour present in the scene is scored on that shape's box, with the attention of
the step that emitted the colour.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from attn_fast.examples.captioning.data import COLOURS, KINDS, Scene

__all__ = ["box_coverage", "mass_in_box", "grounding_score"]


def box_coverage(bbox: tuple[int, int, int, int], grid: int, image_size: int) -> torch.Tensor:
    """[grid²] float64: the fraction of each grid cell's area inside `bbox` = (x0, y0, x1, y1), end-exclusive
    pixels; cells in row-major order."""
    cell = image_size / grid
    edges = torch.arange(grid, dtype=torch.float64) * cell
    x0, y0, x1, y1 = bbox
    overlap_x = (torch.minimum(edges + cell, torch.tensor(float(x1))) - torch.maximum(edges, torch.tensor(float(x0))))
    overlap_y = (torch.minimum(edges + cell, torch.tensor(float(y1))) - torch.maximum(edges, torch.tensor(float(y0))))
    fraction_x, fraction_y = overlap_x.clamp(min=0) / cell, overlap_y.clamp(min=0) / cell
    return (fraction_y[:, None] * fraction_x[None, :]).flatten()


def mass_in_box(weights: torch.Tensor, bbox: tuple[int, int, int, int], grid: int, image_size: int) -> float:
    """Attention mass of `weights` [grid²] inside `bbox` (each weight spread uniformly over its cell)."""
    return float((weights.detach().double().cpu() * box_coverage(bbox, grid, image_size)).sum())


def grounding_score(captions: Sequence[Sequence[str]], attention: torch.Tensor | Sequence[torch.Tensor],
                    scenes: Sequence[Scene], grid: int, *, words: str = "shapes") -> dict:
    """Attention grounding of emitted shape words, or of colour words with `words="colours"` (rules in the module
    docstring).

    captions: the words of each generated caption (EOS excluded); attention: per caption, [≥ len(words), grid²]
    (the attention of the step that emitted each word, as `Decoded.attention[b]`); scenes: the images' scenes.
    Returns {"grounding": mean mass inside the named shape's box, "chance": mean box area / image area,
    "matched": shape words scored, "unmatched": shape words naming no shape of the scene}; the means are NaN when
    nothing matched.
    """
    if not len(captions) == len(attention) == len(scenes):
        raise ValueError(f"{len(captions)} captions, {len(attention)} attention maps, {len(scenes)} scenes")
    if words not in ("shapes", "colours"):
        raise ValueError(f'words must be "shapes" or "colours", got {words!r}')
    masses, chances, unmatched = [], [], 0
    for caption, weights, scene in zip(captions, attention, scenes):
        for t, word in enumerate(caption):
            if words == "colours":
                if word not in COLOURS:
                    continue
                shape = next((s for s in scene.shapes if s.colour == word), None)
            else:
                if word not in KINDS or t == 0 or caption[t - 1] not in COLOURS:
                    continue
                shape = next((s for s in scene.shapes if (s.colour, s.kind) == (caption[t - 1], word)), None)
            if shape is None:
                unmatched += 1
                continue
            masses.append(mass_in_box(weights[t], shape.bbox, grid, scene.image_size))
            chances.append(shape.size ** 2 / scene.image_size ** 2)
    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return {"grounding": mean(masses), "chance": mean(chances), "matched": len(masses), "unmatched": unmatched}
