"""The dense-shapes generator: determinism, instance masks, and the cues that make it learnable
(foreground told by its colour, the class by its texture)."""

import numpy as np
import pytest

from cmae.data import dense_shapes
from cmae.data.dense_shapes import CLASSES, MAX_INSTANCES, generate, sample, semantic_labels

SIZE = 64


@pytest.fixture(scope="module")
def scenes():
    return generate(60, SIZE, seed=5)


def test_a_scene_is_a_pure_function_of_size_seed_and_index(scenes):
    again = sample(SIZE, 5, 7)
    assert np.array_equal(np.asarray(again.image), np.asarray(scenes[7].image))
    assert [c for c, _ in again.instances] == [c for c, _ in scenes[7].instances]
    for (_, a), (_, b) in zip(again.instances, scenes[7].instances, strict=True):
        assert np.array_equal(a, b)
    other = sample(SIZE, 6, 7)
    assert not np.array_equal(np.asarray(other.image), np.asarray(again.image))


def test_instances_are_visible_disjoint_and_not_small(scenes):
    counts = []
    for s in scenes:
        assert s.image.mode == "RGB" and s.image.size == (SIZE, SIZE)
        assert 1 <= len(s.instances) <= MAX_INSTANCES
        counts.append(len(s.instances))
        taken = np.zeros((SIZE, SIZE), bool)
        for cls, mask in s.instances:
            assert 1 <= cls <= len(CLASSES)
            assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
            assert mask.sum() >= 0.03 * SIZE * SIZE  # large: >= 3 % of the image each
            assert not (mask & taken).any()  # visible masks never share a pixel
            taken |= mask
        label = semantic_labels(s)
        assert label.dtype == np.uint8
        assert np.array_equal(label > 0, taken)
        for cls, mask in s.instances:
            assert (label[mask] == cls).all()
    assert max(counts) >= 2  # scenes with several instances occur
    classes = {c for s in scenes for c, _ in s.instances}
    assert classes == set(range(1, len(CLASSES) + 1))


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 8 neighbours (the anti-aliased edge pixels are mixed colours)."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _spread(img: np.ndarray) -> np.ndarray:
    """Per-pixel colour saturation proxy: max - min over RGB."""
    x = img.astype(np.int16)
    return x.max(-1) - x.min(-1)


def test_a_pixel_tells_foreground_from_background(scenes):
    """Shapes are saturated, the background grey: one pixel's colour separates them (the cue
    the old tiled shapes lacked: there both colours were random)."""
    fg, bg = [], []
    for s in scenes:
        spread = _spread(np.asarray(s.image))
        label = semantic_labels(s)
        edge = _grow(label > 0) & _grow(label == 0)
        bg.append(spread[(label == 0) & ~edge])
        fg.append(spread[(label > 0) & ~edge])
    bg, fg = np.concatenate(bg), np.concatenate(fg)
    assert bg.max() <= 2  # grey (noise is the same on all channels)
    assert np.quantile(fg, 0.05) > 20


def test_each_class_has_its_texture(scenes):
    """The solid disc is one shade; stripes and checks alternate two, so the brightness varies
    inside any small window of them; only the checks mix two hues (the chromaticity, RGB over
    its sum, varies: a dark shade of the same hue keeps it)."""
    brightness = {c: [] for c in range(1, len(CLASSES) + 1)}
    hues = {c: [] for c in range(1, len(CLASSES) + 1)}
    for s in scenes:
        rgb = np.asarray(s.image, np.float32)
        grey = np.asarray(s.image.convert("L"), np.float32)
        for cls, mask in s.instances:
            ys, xs = np.nonzero(mask)
            cy, cx = int(ys.mean()), int(xs.mean())
            win = (slice(cy - 4, cy + 4), slice(cx - 4, cx + 4))  # 8 x 8 px at the centre
            if mask[win].all():
                brightness[cls].append(grey[win].std())
                px = rgb[win].reshape(-1, 3)
                hues[cls].append((px / px.sum(1, keepdims=True).clip(min=1)).std(0).mean())
    solid = CLASSES.index("solid_disc") + 1
    checks = CLASSES.index("checkered_triangle") + 1
    for cls in brightness:
        name = CLASSES[cls - 1]
        assert brightness[cls], name
        if cls == solid:
            assert np.median(brightness[cls]) < 8
        else:
            assert np.median(brightness[cls]) > 20, name
        if cls == checks:
            assert min(hues[cls]) > 0.05
        else:
            assert max(hues[cls]) < 0.04, name


def test_grey_renders_the_same_scene_in_grey_levels():
    color, grey = sample(SIZE, 3, 1), sample(SIZE, 3, 1, colors="grey")
    g = np.asarray(grey.image)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert not np.array_equal(g, np.asarray(color.image))
    assert np.array_equal(semantic_labels(grey), semantic_labels(color))


def test_other_sizes_scale_the_scene():
    s = sample(160, 0, 2)
    assert s.image.size == (160, 160)
    assert all(m.shape == (160, 160) and m.sum() >= 0.03 * 160 * 160 for _, m in s.instances)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"size": 8}, "size >= 16"), ({"colors": "blue"}, "colors")]
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    args = {"size": SIZE, "seed": 0, "index": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dense_shapes.sample(**args)


def test_every_visible_shape_pixel_is_painted():
    """No mask pixel keeps the grey background (a mask drawn beyond the painted area): even an
    anti-aliased edge pixel, at least half shape, is coloured."""
    for s in generate(50, 96, seed=11):
        spread = _spread(np.asarray(s.image))
        assert spread[semantic_labels(s) > 0].min() > 2
