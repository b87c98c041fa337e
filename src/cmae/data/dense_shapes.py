"""Generated scenes for the dense demos (``cmae segment`` and ``cmae detect`` without data): a
few large shapes on a grey background, each class with its own outline and texture.

What makes them learnable in a few hundred CPU iterations, where the classification shapes
(``cmae.data.datasets``) tiled into scenes were not: every foreground pixel is visible as such
on its own (shapes are saturated colours, the background is grey), and a class shows in any
small window of its shape (its texture), not only in the whole outline, which a training crop
may cut. Colour (hue, brightness) is drawn per instance and says nothing about the class.

The classes: ``solid_disc`` (one flat colour), ``striped_square`` (broad stripes in a bright
and a dark shade of one hue), ``checkered_triangle`` (fine checks in two hues); the stripes
and checks turn with their shape. Sizes are fractions of the image side, so a scene at 128 px
is the one at 64 px, sharper.

- ``CLASSES``: the K class names (``cmae segment`` adds background as label 0).
- ``sample(size, seed, index)``: one scene, a pure function of its arguments;
  ``generate(n, size, seed)`` the first ``n``.
- ``DenseSample``: (PIL RGB image ``size`` x ``size``, instances: (class 1..K, bool [H, W]
  visible mask)); 1 to ``MAX_INSTANCES`` instances, each keeping at least ``MIN_VISIBLE`` of
  its area visible under the later ones, in drawing order.
- ``semantic_labels(sample)``: the uint8 [H, W] label map (0 background, class k as k).
"""

from __future__ import annotations

import colorsys
import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["solid_disc", "striped_square", "checkered_triangle"]
COLORS = ("color", "grey")
MAX_INSTANCES = 3
RADIUS = (0.2, 0.3)  # circumradius as a fraction of the image side
MIN_VISIBLE = 0.6  # an instance keeps at least this fraction of its pixels visible
STRIPE_PERIOD = (0.18, 0.22)  # of the image side: broad bands
CHECKER_CELL = (0.04, 0.05)  # of the image side: a fine grain, unlike the stripes
# a triangle's circumradius over its circle's: an area near the others' (its tips may leave
# the image)
TRIANGLE_SCALE = 1.2
PLACE_TRIES = 20
SUPERSAMPLE = 2  # anti-aliased edges and textures


class DenseSample(NamedTuple):
    image: Image.Image  # RGB, size x size
    instances: list[tuple[int, np.ndarray]]  # (class 1..K, bool [size, size] visible mask)


class _Shape(NamedTuple):
    cls: int  # 1..K
    cx: float  # centre and circumradius in supersampled pixels
    cy: float
    r: float
    rot: float


def generate(n: int, size: int, seed: int, colors: str = "color") -> list[DenseSample]:
    """Scenes 0..n-1 of ``seed`` (``sample``)."""
    return [sample(size, seed, i, colors) for i in range(n)]


def semantic_labels(s: DenseSample) -> np.ndarray:
    """uint8 [H, W]: 0 background, the class of the visible instance elsewhere."""
    w, h = s.image.size
    label = np.zeros((h, w), np.uint8)
    for cls, mask in s.instances:
        label[mask] = cls
    return label


def sample(size: int, seed: int, index: int, colors: str = "color") -> DenseSample:
    """Scene ``index`` of ``seed`` at ``size`` x ``size``; ``colors="grey"`` renders the same
    scene in grey levels (a harder variant: the foreground is no longer told by its colour)."""
    if size < 16:
        raise ValueError(f"dense shapes need an image size >= 16, got {size}")
    if colors not in COLORS:
        raise ValueError(f"colors must be one of {COLORS}, got {colors!r}")
    rng = np.random.default_rng([seed, index])
    big = size * SUPERSAMPLE
    shapes = _place(rng, big)
    masks = [_outline(s, big) for s in shapes]  # float [big, big] in {0, 1}
    # back to front: drop an instance the later ones would hide too much
    keep, cover = [], np.zeros((size, size), bool)
    for s, m in zip(reversed(shapes), reversed(masks), strict=True):
        full = _down(m) >= 0.5
        visible = full & ~cover
        if visible.sum() >= MIN_VISIBLE * max(full.sum(), 1) and visible.any():
            keep.append((s, m, visible))
            cover |= full
    keep.reverse()

    img = _background(rng, big)
    for s, m, _ in keep:  # composite inside the shape's box only: fast at any image size
        e = TRIANGLE_SCALE * s.r  # the largest extent of any outline
        y0, x0 = max(int(s.cy - e) - 1, 0), max(int(s.cx - e) - 1, 0)
        y1, x1 = min(int(s.cy + e) + 2, big), min(int(s.cx + e) + 2, big)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        tex = _texture(rng, s, xs, ys, big)
        bright, dark = _shades(rng, CLASSES[s.cls - 1] == "checkered_triangle")
        fill = dark + (bright - dark) * tex[..., None]
        a = m[y0:y1, x0:x1, None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + fill * a
    img = _down(img)
    img = img + rng.normal(0, rng.uniform(1, 6), (size, size, 1)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if colors == "grey":
        img = np.repeat(np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)
    instances = [(s.cls, visible) for s, _, visible in keep]
    return DenseSample(Image.fromarray(img, "RGB"), instances)


def _place(rng: np.random.Generator, big: int) -> list[_Shape]:
    """1..MAX_INSTANCES shapes inside the image, centres far enough apart that outlines
    overlap little (a shape that finds no place in PLACE_TRIES draws is left out)."""
    shapes: list[_Shape] = []
    for _ in range(int(rng.integers(1, MAX_INSTANCES + 1))):
        cls = int(rng.integers(len(CLASSES))) + 1
        r = rng.uniform(*RADIUS) * big
        rot = rng.uniform(0, 2 * math.pi)
        for _ in range(PLACE_TRIES):
            cx, cy = rng.uniform(r, big - r, 2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > 0.75 * (r + o.r) for o in shapes):
                shapes.append(_Shape(cls, cx, cy, r, rot))
                break
    return shapes


def _outline(s: _Shape, big: int) -> np.ndarray:
    """The class's outline, float {0, 1} [big, big]: a disc, a square, a triangle."""
    im = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(im)
    name = CLASSES[s.cls - 1]
    if name == "solid_disc":
        r = s.r * 0.85  # a disc fills its circle: similar areas across classes
        draw.ellipse([s.cx - r, s.cy - r, s.cx + r, s.cy + r], fill=1)
    else:
        n, r = (4, s.r) if name == "striped_square" else (3, TRIANGLE_SCALE * s.r)
        angles = [s.rot + 2 * math.pi * j / n for j in range(n)]
        pts = [(s.cx + r * math.cos(a), s.cy + r * math.sin(a)) for a in angles]
        draw.polygon(pts, fill=1)
    return np.asarray(im, dtype=np.float32)


def _texture(
    rng: np.random.Generator, s: _Shape, xs: np.ndarray, ys: np.ndarray, big: int
) -> np.ndarray:
    """float [big, big] in {0, 1}: 1 takes the bright shade, 0 the dark one."""
    name = CLASSES[s.cls - 1]
    c, si = math.cos(s.rot), math.sin(s.rot)
    u = (xs - s.cx) * c + (ys - s.cy) * si  # the shape's own axes: textures turn with it
    v = -(xs - s.cx) * si + (ys - s.cy) * c
    if name == "solid_disc":
        return np.ones_like(xs)
    if name == "striped_square":
        period = rng.uniform(*STRIPE_PERIOD) * big
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    cell = rng.uniform(*CHECKER_CELL) * big
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _shades(rng: np.random.Generator, two_hues: bool) -> tuple[np.ndarray, np.ndarray]:
    """(bright, dark) RGB of one random saturated hue, the dark shade at half the value;
    ``two_hues``: the dark one in another hue (the checks then differ from stripes in
    any 4 px window by colour too, not only by their finer grain)."""
    h, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)
    bright = np.array(colorsys.hsv_to_rgb(h, sat, val), np.float32) * 255
    h2 = (h + 1 / 3) % 1 if two_hues else h  # a third round: their blend stays coloured
    dark = np.array(colorsys.hsv_to_rgb(h2, sat, val * 0.5), np.float32) * 255
    return bright, dark


def _background(rng: np.random.Generator, big: int) -> np.ndarray:
    """float [big, big, 3]: a grey linear gradient."""
    g0 = rng.uniform(70, 190)
    g1 = np.clip(g0 + rng.uniform(-50, 50), 0, 255)
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(0, 1, big, dtype=np.float32)
    ramp = math.cos(a) * t[None, :] + math.sin(a) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return np.repeat((g0 + (g1 - g0) * ramp)[..., None], 3, axis=2)


def _down(x: np.ndarray) -> np.ndarray:
    """Box-average SUPERSAMPLE x SUPERSAMPLE blocks: [big, big, ...] -> [size, size, ...]."""
    k = SUPERSAMPLE
    h, w = x.shape[0] // k, x.shape[1] // k
    return x.reshape(h, k, w, k, *x.shape[2:]).mean(axis=(1, 3))
