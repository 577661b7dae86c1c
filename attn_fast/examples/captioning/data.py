"""Data for the captioning example: generated scenes of 1-3 coloured shapes, their captions, word vocabulary,
batches and PNG input/output. Nothing is downloaded; everything is a function of a seed.

    splits = make_scene_splits(seed=0, sizes=(20000, 1000, 1000))     # SceneSplits(train, valid, test)
    scene = splits.test[0]
    scene.caption                          # "a red circle above a blue square"
    image = render_scene(scene)            # [3, 64, 64] float32 in 0..1
    vocab = WordVocab()                    # the fixed vocabulary of the caption grammar
    for images, tgt_in, tgt_out in batches(splits.train, vocab, 64, generator=0):
        ...                                # [B, 3, 64, 64] float32, [B, T], [B, T] int64 (BOS first / EOS last)

Scenes: a black square image with 1, 2 or 3 filled shapes (circle, square, triangle) of distinct colours (red,
green, blue, yellow), sizes (bounding-box sides) 10..20 pixels, at random positions, bounding boxes at least
2 pixels apart.

Captions (exactly one correct caption per scene):
- the shapes are named in the fixed colour order red, green, blue, yellow: "a red circle", "a blue square", ...;
- one shape: "a red circle"; two: "a red circle above a blue square"; three: the first shape related to the two
  others, "a red circle above a green square and left of a blue triangle";
- the relation of shape P to shape Q compares their bounding-box centres along the axis where they are further
  apart: "above"/"below" (image rows grow downwards) or "left of"/"right of". Scenes where the two distances are
  within 4 pixels of each other are not generated, so that the relation is never a judgement call.

Splits are by the scene itself: a scene's split depends only on (seed, its signature = the colour, kind,
position and size of every shape), so an identical scene never appears in two splits. Captions do repeat across
splits (there are only a few hundred), as an image-captioning test set repeats phrases; what is new in a test
scene is the image.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from attn_fast.examples.errors import UserError

__all__ = ["COLOURS", "KINDS", "RELATIONS", "IMAGE_SIZE", "Shape", "Scene", "SceneSplits", "relation",
           "caption_for", "sample_scene", "scene_split", "make_scene_splits", "render_scene", "render_images",
           "WordVocab", "CaptionBatch", "batch_scenes", "make_batch", "batches", "save_png", "load_png"]

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (0.95, 0.85, 0.1)}
KINDS = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 48
SIZE_RANGE = (10, 20)          # bounding-box side in pixels, inclusive
MIN_GAP = 2                    # pixels between bounding boxes
AMBIGUITY_MARGIN = 4.0         # | |dx| - |dy| | below this makes a relation a judgement call: not generated
# Share of all scenes held out for validation and for test, fixed (not derived from the sizes asked for) so that a
# scene's split never changes when someone asks for other sizes.
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05


class Shape(NamedTuple):
    """One filled shape; its bounding box is columns [x, x + size) and rows [y, y + size) of the image."""

    colour: str
    kind: str
    x: int
    y: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        """(column, row) of the bounding-box centre, in pixels."""
        return self.x + self.size / 2, self.y + self.size / 2

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def words(self) -> str:
        return f"{self.colour} {self.kind}"


class Scene(NamedTuple):
    """Shapes in caption order (the colour order), the image side in pixels, and the caption."""

    shapes: tuple[Shape, ...]
    image_size: int
    caption: str


class SceneSplits(NamedTuple):
    train: list[Scene]
    valid: list[Scene]
    test: list[Scene]


# ----------------------------------------------------------------------------------------------------------------
# Scenes and captions
# ----------------------------------------------------------------------------------------------------------------

def relation(first: Shape, second: Shape) -> str:
    """Where `first` is relative to `second`: "above", "below", "left of" or "right of" (see the module
    docstring)."""
    (x1, y1), (x2, y2) = first.centre, second.centre
    dx, dy = x1 - x2, y1 - y2
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _ambiguous(first: Shape, second: Shape) -> bool:
    (x1, y1), (x2, y2) = first.centre, second.centre
    return abs(abs(x1 - x2) - abs(y1 - y2)) < AMBIGUITY_MARGIN


def caption_for(shapes: Sequence[Shape]) -> str:
    """The caption of shapes given in caption order (1 to 3 of them)."""
    first, *others = shapes
    if not 0 <= len(others) <= 2:
        raise ValueError(f"a scene has 1 to 3 shapes, got {len(shapes)}")
    parts = [f"a {first.words}"]
    for number, other in enumerate(others):
        parts.append(("and " if number else "") + f"{relation(first, other)} a {other.words}")
    return " ".join(parts)


def _overlaps(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return not (ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0)


def sample_scene(rng: random.Random, image_size: int = IMAGE_SIZE) -> Scene:
    """Draw one scene: 1-3 shapes (equally likely) of distinct colours, non-overlapping, no ambiguous relation."""
    count = rng.randint(1, 3)
    while True:  # rarely more than one round: 3 shapes of <= 20 px fit easily in 64 x 64
        colours = sorted(rng.sample(list(COLOURS), count), key=list(COLOURS).index)  # caption order
        shapes: list[Shape] = []
        for colour in colours:
            for _ in range(100):
                size = rng.randint(*SIZE_RANGE)
                shape = Shape(colour, rng.choice(KINDS), rng.randint(0, image_size - size),
                              rng.randint(0, image_size - size), size)
                if not any(_overlaps(shape, s) for s in shapes) and not (shapes and _ambiguous(shapes[0], shape)):
                    shapes.append(shape)
                    break
        if len(shapes) == count:
            return Scene(tuple(shapes), image_size, caption_for(shapes))


def scene_split(scene: Scene, seed: int) -> str:
    """"train", "valid" or "test": a function of (seed, the scene's signature) only."""
    signature = repr((seed, scene.image_size, sorted(scene.shapes)))
    fraction = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big") / 2 ** 64
    if fraction < TEST_FRACTION:
        return "test"
    return "valid" if fraction < TEST_FRACTION + VALID_FRACTION else "train"


def make_scene_splits(seed: int = 0, sizes: tuple[int, int, int] = (20000, 1000, 1000),
                      image_size: int = IMAGE_SIZE) -> SceneSplits:
    """(train, valid, test) scenes. One stream of scenes is drawn from `seed` and each scene goes to the split its
    signature picks (`scene_split`) until every split has its size; a split's k-th scene is the same whatever the
    sizes asked for, and no scene appears in two splits."""
    if any(n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative, got {sizes}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (room for three shapes), got {image_size}")
    rng = random.Random(f"attn-fast scenes {seed} {image_size}")
    wanted = dict(zip(("train", "valid", "test"), sizes))
    splits: dict[str, list[Scene]] = {name: [] for name in wanted}
    seen: set = set()
    while any(len(splits[name]) < wanted[name] for name in wanted):
        scene = sample_scene(rng, image_size)
        key = tuple(sorted(scene.shapes))
        name = scene_split(scene, seed)
        if key not in seen and len(splits[name]) < wanted[name]:  # no duplicate inside a split either
            seen.add(key)
            splits[name].append(scene)
    return SceneSplits(splits["train"], splits["valid"], splits["test"])


# ----------------------------------------------------------------------------------------------------------------
# Rendering and PNG files
# ----------------------------------------------------------------------------------------------------------------

def _shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """[H, W] bool: the pixels the shape covers (pixel centres at integer + 0.5)."""
    rows, cols = np.mgrid[0:image_size, 0:image_size] + 0.5
    x0, y0, x1, y1 = shape.bbox
    inside_box = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    cx, cy = shape.centre
    if shape.kind == "square":
        return inside_box
    if shape.kind == "circle":
        return (cols - cx) ** 2 + (rows - cy) ** 2 <= (shape.size / 2) ** 2
    # triangle, apex up: the half-width grows linearly from 0 at the top edge to size/2 at the bottom edge
    return inside_box & (np.abs(cols - cx) <= (rows - y0) / 2)


def render_scene(scene: Scene) -> torch.Tensor:
    """The scene's image: [3, H, W] float32 in 0..1 (black background)."""
    image = np.zeros((scene.image_size, scene.image_size, 3), dtype=np.float32)
    for shape in scene.shapes:
        image[_shape_mask(shape, scene.image_size)] = COLOURS[shape.colour]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def render_images(scenes: Sequence[Scene]) -> torch.Tensor:
    """[B, 3, H, W] float32: the scenes' images (all of one size)."""
    return torch.stack([render_scene(s) for s in scenes]) if scenes else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a [3, H, W] image in 0..1 as a PNG (through matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy())


def load_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG as a [3, H, W] float32 image in 0..1 (an alpha channel is dropped; grey becomes RGB). A missing
    file, one that is not an image, or an image of another layout raises UserError naming `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(path):
        raise UserError(f"{os.fspath(path)}: no such image file" if not os.path.exists(path)
                        else f"{os.fspath(path)}: not a file")
    try:
        pixels = np.asarray(plt.imread(path), dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: unidentified or truncated image, bad chunks
        raise UserError(f"{os.fspath(path)}: cannot read it as a PNG image ({error})") from None
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise UserError(f"{os.fspath(path)}: expected an RGB(A) or grey image, got an array of shape "
                        f"{pixels.shape}")
    if pixels.max() > 1.0:  # 8-bit values (matplotlib returns floats in 0..1 for PNG, but be lenient)
        pixels = pixels / 255.0
    return torch.from_numpy(np.ascontiguousarray(pixels[:, :, :3])).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Words and batches
# ----------------------------------------------------------------------------------------------------------------

class WordVocab:
    """The fixed vocabulary of the caption grammar: PAD = 0, BOS = 1, EOS = 2, then every word a caption can use
    (and UNK = 3 for anything else)."""

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

    def __init__(self, words: Sequence[str] | None = None):
        if words is None:
            words = ["a", "and", *COLOURS, *KINDS, *dict.fromkeys(w for r in RELATIONS for w in r.split())]
        self.itos = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordVocab) and self.itos == other.itos

    def encode(self, caption: str) -> list[int]:
        """Word ids, without BOS/EOS."""
        return [self.stoi.get(w, self.UNK) for w in caption.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Caption text; stops at EOS, skips PAD and BOS."""
        words = []
        for i in ids:
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, state: dict) -> WordVocab:
        return cls(state["itos"])


class CaptionBatch(NamedTuple):
    """images [B, 3, H, W] float32; tgt_in [B, T] int64 (BOS, words, PAD...); tgt_out [B, T] (words, EOS,
    PAD...)."""

    images: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor


def batch_scenes(scenes: Sequence[Scene], batch_size: int, *, shuffle: bool = True,
                 generator: torch.Generator | int | None = None) -> list[list[Scene]]:
    """The scenes of each batch, in order (the last batch may be smaller): what `batches` renders, cheap to hold
    for a whole epoch. `generator` (or a seed) fixes the shuffled order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    order = torch.randperm(len(scenes), generator=generator).tolist() if shuffle else list(range(len(scenes)))
    return [[scenes[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def make_batch(chosen: Sequence[Scene], vocab: WordVocab) -> CaptionBatch:
    """The rendered images of `chosen` (at least one scene) and their padded captions."""
    words = [vocab.encode(s.caption) for s in chosen]
    width = max(len(w) for w in words) + 1
    tgt_in = torch.full((len(chosen), width), vocab.PAD, dtype=torch.long)
    tgt_out = torch.full((len(chosen), width), vocab.PAD, dtype=torch.long)
    for row, ids in enumerate(words):
        tgt_in[row, : len(ids) + 1] = torch.tensor([vocab.BOS, *ids])
        tgt_out[row, : len(ids) + 1] = torch.tensor([*ids, vocab.EOS])
    return CaptionBatch(render_images(chosen), tgt_in, tgt_out)


def batches(scenes: Sequence[Scene], vocab: WordVocab, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | int | None = None) -> Iterator[CaptionBatch]:
    """Batches of rendered images and their padded captions (the last batch may be smaller), rendered one at a
    time. `generator` (or a seed) fixes the shuffled order."""
    for chosen in batch_scenes(scenes, batch_size, shuffle=shuffle, generator=generator):
        yield make_batch(chosen, vocab)
