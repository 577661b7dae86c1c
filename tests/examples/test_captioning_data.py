"""Generated scenes: deterministic from the seed, splits disjoint by scene, captions that say what the rendered
pixels show (colours, shapes' areas, relations recomputed from the pixels), vocabulary, batches and PNG files."""
import math
import random
import re

import pytest
import torch

from attn_fast.examples.captioning.data import (
    COLOURS,
    KINDS,
    Scene,
    Shape,
    WordVocab,
    batches,
    caption_for,
    load_png,
    make_scene_splits,
    relation,
    render_images,
    render_scene,
    sample_scene,
    save_png,
    scene_split,
)


@pytest.fixture(scope="module")
def splits():
    return make_scene_splits(seed=5, sizes=(300, 60, 60))


def test_splits_are_deterministic_from_the_seed(splits):
    again = make_scene_splits(seed=5, sizes=(300, 60, 60))
    assert again == splits
    assert torch.equal(render_images(again.test[:8]), render_images(splits.test[:8]))
    assert make_scene_splits(seed=6, sizes=(300, 60, 60)).train != splits.train
    # A split's k-th scene does not depend on the sizes asked for.
    larger = make_scene_splits(seed=5, sizes=(10, 0, 100))
    assert larger.train == splits.train[:10] and larger.test[:60] == splits.test and larger.valid == []


def test_splits_are_disjoint_by_scene(splits):
    signatures = {name: {tuple(sorted(s.shapes)) for s in getattr(splits, name)} for name in splits._fields}
    assert [len(signatures[name]) for name in splits._fields] == [300, 60, 60]  # no duplicate inside a split
    assert not signatures["train"] & signatures["test"]
    assert not signatures["train"] & signatures["valid"]
    assert not signatures["valid"] & signatures["test"]
    for name in splits._fields:
        assert all(scene_split(s, 5) == name for s in getattr(splits, name))


def test_scenes_follow_the_rules(splits):
    scenes = splits.train
    counts = {n: sum(len(s.shapes) == n for s in scenes) for n in (1, 2, 3)}
    assert all(counts[n] > 60 for n in (1, 2, 3)), counts
    for scene in scenes:
        colours = [shape.colour for shape in scene.shapes]
        assert colours == sorted(colours, key=list(COLOURS).index) and len(set(colours)) == len(colours)
        for shape in scene.shapes:
            assert 0 <= shape.x and shape.x + shape.size <= 64 and 0 <= shape.y and shape.y + shape.size <= 64
            assert 10 <= shape.size <= 20 and shape.kind in KINDS
        assert scene.caption == caption_for(scene.shapes)


def pixels_of(image, colour):
    """[N, 2] (row, col) of the pixels of exactly this colour in image [3, H, W]."""
    rgb = torch.tensor(COLOURS[colour], dtype=image.dtype)[:, None, None]
    return (image == rgb).all(dim=0).nonzero().double()


def relation_from_pixels(first, second):
    """The caption's rule applied to the centres of the pixels' bounding boxes."""
    def centre(points):
        (r0, c0), (r1, c1) = points.min(0).values, points.max(0).values
        return (c0 + c1 + 1) / 2, (r0 + r1 + 1) / 2
    (x1, y1), (x2, y2) = centre(first), centre(second)
    if abs(y1 - y2) > abs(x1 - x2):
        return "above" if y1 < y2 else "below"
    return "left of" if x1 < x2 else "right of"


def test_captions_describe_the_rendered_pixels(splits):
    """Read each caption's words back from the image: colours present with the right shape (area relative to the
    bounding box: square 1, circle π/4, triangle 1/2), nothing else drawn, relations as the pixels say."""
    fill = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    for scene in splits.test[:30]:
        image = render_scene(scene)
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        words = scene.caption.split()
        named = [(words[i - 1], w) for i, w in enumerate(words) if w in KINDS]
        assert [(s.colour, s.kind) for s in scene.shapes] == named
        drawn = 0
        for colour, kind in named:
            points = pixels_of(image, colour)
            drawn += len(points)
            (r0, c0), (r1, c1) = points.min(0).values, points.max(0).values
            side = max(r1 - r0, c1 - c0) + 1
            assert len(points) / side ** 2 == pytest.approx(fill[kind], abs=0.12), (scene, colour)
        assert int((image.sum(0) > 0).sum()) == drawn  # the background is black
        relations = re.findall(r"(above|below|left of|right of) a ", scene.caption)
        assert len(relations) == len(named) - 1
        for said, other in zip(relations, named[1:]):
            assert said == relation_from_pixels(pixels_of(image, named[0][0]), pixels_of(image, other[0])), scene


def test_relation_and_caption_by_hand():
    red = Shape("red", "circle", 0, 0, 10)             # centre (5, 5)
    blue = Shape("blue", "square", 2, 40, 12)          # centre (8, 46): far below
    yellow = Shape("yellow", "triangle", 40, 3, 10)    # centre (45, 8): far right
    assert relation(red, blue) == "above" and relation(blue, red) == "below"
    assert relation(red, yellow) == "left of" and relation(yellow, red) == "right of"
    assert caption_for([red]) == "a red circle"
    assert caption_for([red, blue]) == "a red circle above a blue square"
    assert caption_for([red, blue, yellow]) == "a red circle above a blue square and left of a yellow triangle"


def test_no_generated_relation_is_a_judgement_call():
    rng = random.Random(0)
    for _ in range(300):
        first, *others = sample_scene(rng).shapes
        for other in others:
            (x1, y1), (x2, y2) = first.centre, other.centre
            assert abs(abs(x1 - x2) - abs(y1 - y2)) >= 4


def test_vocabulary_and_batches(splits):
    vocab = WordVocab()
    assert (vocab.PAD, vocab.BOS, vocab.EOS) == (0, 1, 2) and WordVocab.from_dict(vocab.to_dict()) == vocab
    for scene in splits.train:
        assert vocab.UNK not in vocab.encode(scene.caption)
        assert vocab.decode(vocab.encode(scene.caption) + [vocab.EOS, 5]) == scene.caption
    seen = []
    for images, tgt_in, tgt_out in batches(splits.train[:50], vocab, 16, generator=3):
        assert images.shape == (len(tgt_in), 3, 64, 64) and tgt_in.shape == tgt_out.shape
        assert torch.all(tgt_in[:, 0] == vocab.BOS)
        lengths = (tgt_out != vocab.PAD).sum(1)
        assert torch.all(tgt_out[torch.arange(len(lengths)), lengths - 1] == vocab.EOS)
        assert torch.equal(tgt_in[:, 1:] != vocab.PAD, (tgt_out != vocab.PAD)[:, :-1] & (tgt_out != vocab.EOS)[:, :-1])
        seen += [vocab.decode(row.tolist()) for row in tgt_out]
    assert sorted(seen) == sorted(s.caption for s in splits.train[:50])  # every scene once per epoch
    order = [b.tgt_out.tolist() for b in batches(splits.train[:50], vocab, 16, generator=3)]
    assert order == [b.tgt_out.tolist() for b in batches(splits.train[:50], vocab, 16, generator=3)]


def test_png_round_trip(tmp_path, splits):
    image = render_scene(splits.test[0])
    save_png(image, tmp_path / "scene.png")
    loaded = load_png(tmp_path / "scene.png")
    assert loaded.shape == image.shape and loaded.dtype == torch.float32
    assert (loaded - image).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG


def test_scene_is_a_plain_value():
    scene = Scene((Shape("red", "circle", 1, 2, 10),), 64, "a red circle")
    assert scene.shapes[0].bbox == (1, 2, 11, 12) and scene.shapes[0].centre == (6.0, 7.0)
