"""Every augmentation the commands use, at the ends of its parameter range, on Pillow >= 11.

Finding (timm 1.0.31, torchvision 0.29.1, Pillow 13): the only out-of-range argument is
posterize with 0 bits, which Pillow rejects since version 11 (``ImageOps.posterize``: bits in
[1, 8]). timm's ``PosterizeIncreasing`` keeps 0 bits at magnitude 10, reached by the fine-tuning
default ``rand-m9-mstd0.5-inc1`` (N(9, 0.5) clipped at 10), and ``Posterize`` (``inc0``) keeps 0
bits below magnitude 2.5. ``cmae.eval.finetune.clamp_posterize`` keeps at least 1 bit. Every other
RandAugment op, random erasing, mixup / cutmix, the pretraining target's colour jitter /
grayscale / blur and the linear probe's crop + flip accept both ends of their ranges.
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cmae.data.views import crop_flip, eval_transform, target_color_transform
from cmae.eval.finetune import (
    POSTERIZE_OPS,
    build_mixup,
    clamp_posterize,
    train_transform,
)
from cmae.eval.linprobe import PROBE_CROP_RATIO, PROBE_CROP_SCALE

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT = "rand-m9-mstd0.5-inc1"  # FinetuneConfig.rand_augment
TOP = 10  # timm's magnitude upper bound (_LEVEL_DENOM) without an 'mmax' in the spec


def photo(size: int = 32, seed: int = 0) -> Image.Image:
    """An RGB picture with smooth gradients and noise, so every colour op changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.integers(0, 55, (size, size, 3))
    return Image.fromarray(base.astype(np.uint8))


def rand_augment(transform) -> RandAugment:
    return next(t for t in transform.transforms if isinstance(t, RandAugment))


def all_ops(magnitude: float, mstd: float = 0.0) -> list:
    """Every RandAugment op of both timm op sets (inc1: the default; inc0), built through the
    fine-tuning transform, applied always (p = 1)."""
    ops = []
    for inc in (1, 0):
        ra = rand_augment(train_transform(32, f"rand-m9-mstd{mstd}-inc{inc}", MEAN, STD))
        for op in ra.ops:
            op.prob, op.magnitude = 1.0, magnitude
            ops.append(op)
    return ops


def test_default_recipe_survives_the_top_magnitude_with_noise():
    """The fine-tuning transform of the default recipe, every op forced to be applied at
    magnitude 10 with the recipe's N(m, 0.5) noise (half the draws clip at 10): no error, and
    the top magnitude still posterizes (to 1 bit). Fails without the clamp (0 bits)."""
    t = train_transform(32, DEFAULT, MEAN, STD)
    ra = rand_augment(t)
    assert ra.ops[0].magnitude_std == 0.5
    for op in ra.ops:
        op.prob, op.magnitude = 1.0, TOP
    ra.num_layers = len(ra.ops)  # each image goes through many ops, posterize among them
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    img = photo()
    for _ in range(20):
        out = t(img)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    poster = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    poster.magnitude_std = 0.0
    np.testing.assert_array_equal(np.asarray(poster(img)), np.asarray(ImageOps.posterize(img, 1)))


@pytest.mark.parametrize("magnitude", [*range(TOP + 1), 9.75])
def test_every_rand_augment_op_accepts_every_magnitude(magnitude):
    img = photo()
    random.seed(0)
    for op in all_ops(magnitude):
        out = op(img)
        assert isinstance(out, Image.Image) and out.size == img.size, op.name


@pytest.mark.parametrize(
    ("name", "magnitude", "bits"),
    [
        ("PosterizeIncreasing", 0, 4),  # timm's own values where they are >= 1 bit
        ("PosterizeIncreasing", 5, 2),
        ("PosterizeIncreasing", TOP, 1),  # timm: 0 (rejected); clamped
        ("Posterize", 0, 1),  # timm: 0 (rejected); clamped
        ("Posterize", TOP, 4),
    ],
)
def test_posterize_bits_keep_their_meaning(name, magnitude, bits):
    op = next(op for op in all_ops(magnitude) if op.name == name)
    assert op.level_fn(magnitude, op.hparams) == (bits,)


def test_only_posterize_needed_the_clamp():
    """timm's unclamped ops, both op sets, both ends: every failure is a posterize one."""
    img = photo()
    failures = []
    for magnitude in (0, TOP):
        for inc in (1, 0):
            ra = rand_augment_transform(f"rand-m{magnitude}-inc{inc}", {"img_mean": (124,) * 3})
            for op in ra.ops:
                op.prob = 1.0
                try:
                    op(img)
                except ValueError:
                    failures.append(op.name)
    assert failures and set(failures) <= set(POSTERIZE_OPS)
    assert clamp_posterize(ra) == 1  # the one posterize op of the inc0 set
    assert clamp_posterize(ra) == 0  # idempotent


def test_random_erasing_and_cutmix_at_the_extremes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    erased = RandomErasing(1.0, mode="pixel", device="cpu")(x.clone())
    assert torch.isfinite(erased).all() and not torch.equal(erased, x)
    y = torch.arange(4)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (1e-3, 1e-3)):  # lam near 0 / 1 as well
        mix = build_mixup(mixup, cutmix, 0.1, num_classes=4)
        xm, ym = mix(x.clone(), y.clone())
        assert torch.isfinite(xm).all()
        torch.testing.assert_close(ym.sum(dim=1), torch.ones(4))


def test_pretraining_colour_ops_at_the_ends_of_their_ranges():
    """ColorJitter factors [1 - 0.4, 1 + 0.4], hue +-0.1, grayscale, blur sigma 0.1 and 2.0 on
    the uint8 tensors and the PIL images the workers hold."""
    img = photo()
    for x in (img, v2.PILToTensor()(img)):
        for f in (0.6, 1.4):
            for fn in (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation):
                fn(x, f)
        for h in (-0.1, 0.1):
            F.adjust_hue(x, h)
        F.rgb_to_grayscale(x, num_output_channels=3)
        for sigma in (0.1, 2.0):
            F.gaussian_blur(x, kernel_size=[13, 13], sigma=[sigma, sigma])
    always = target_color_transform(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    assert always(v2.PILToTensor()(img)).shape == (3, 32, 32)


def test_linprobe_and_eval_views_on_tiny_images():
    img = photo(size=5)
    aug = crop_flip(32, PROBE_CROP_SCALE, PROBE_CROP_RATIO, 0.5)
    assert aug(img).shape == (3, 32, 32)
    assert eval_transform(32, 0.875)(img).shape == (3, 32, 32)
