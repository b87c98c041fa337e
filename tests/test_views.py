import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from cmae.data.views import (
    TENSOR_RESIZE_MIN,
    PixelShiftViews,
    SingleView,
    crop_flip,
    eval_transform,
    normalize,
    target_color_transform,
)


def random_image(size=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8))


def find_shift(online, target, max_shift):
    s = online.shape[-1]
    found = []
    for dy in range(max_shift):
        for dx in range(max_shift):
            if torch.equal(target[:, : s - dy, : s - dx], online[:, dy:, dx:]):
                found.append((dy, dx))
    return found


def test_target_is_shifted_online_view_without_colour_ops():
    torch.manual_seed(0)
    views = PixelShiftViews(16, 6, target_color=None)
    shifts = set()
    for seed in range(30):
        online, target = views(random_image(seed=seed))
        assert online.shape == target.shape == (3, 16, 16)
        assert online.dtype == torch.uint8
        found = find_shift(online, target, 6)
        assert len(found) == 1, found
        shifts.add(found[0])
    # offsets cover both axes and both ends of [0, max_shift)
    ys, xs = {s[0] for s in shifts}, {s[1] for s in shifts}
    assert len(ys) > 2 and len(xs) > 2


def test_shift_range_hits_both_ends():
    torch.manual_seed(0)
    views = PixelShiftViews(8, 2, target_color=None)
    seen = set()
    for seed in range(40):
        online, target = views(random_image(seed=seed))
        seen |= set(find_shift(online, target, 2))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_zero_shift_gives_identical_views():
    views = PixelShiftViews(16, 0, target_color=None)
    for seed in range(5):
        online, target = views(random_image(seed=seed))
        assert torch.equal(online, target)


def test_colour_ops_change_only_the_target():
    torch.manual_seed(0)
    color = target_color_transform(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    views = PixelShiftViews(16, 0, target_color=color)
    online, target = views(random_image())
    assert not torch.equal(online, target)
    # the online view is the plain crop: same as with colour off under the same RNG
    torch.manual_seed(0)
    online2, _ = PixelShiftViews(16, 0, target_color=None)(random_image())
    assert torch.equal(online, online2)


def test_grayscale_and_blur_apply():
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    gray = target_color_transform(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)(img)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    blurred = target_color_transform(
        jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(1.5, 2.0)
    )(img)
    assert blurred.float().std() < img.float().std()


def test_single_view_and_eval_transform_shapes():
    (x,) = SingleView(16)(random_image())
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    y = eval_transform(16)(random_image())
    assert y.shape == (3, 16, 16)


def test_mae_same_crop_sees_cmae_online_view():
    # data.mae_same_crop: MAE's view is CMAE's online view (same crop, same random draws)
    img = random_image(64)
    for seed in range(3):
        torch.manual_seed(seed)
        online, _ = PixelShiftViews(16, 5)(img)
        torch.manual_seed(seed)
        (mae,) = SingleView(16, max_shift=5)(img)
        torch.manual_seed(seed)
        (own,) = SingleView(16)(img)
        assert torch.equal(mae, online)
        assert not torch.equal(own, online)  # MAE's own crop: a different geometry


def test_mae_same_crop_switch_reaches_the_views():
    from cmae.config import load_config
    from cmae.data.pipeline import build_device_views, build_views

    base = ["model.method=mae", "model.img_size=32", "data.max_shift=5"]
    own = build_views(load_config("tiny", base))
    same = build_views(load_config("tiny", [*base, "data.mae_same_crop=true"]))
    assert own.transform.transforms[0].size == (32, 32)
    assert same.transform.transforms[0].size == (37, 37)
    dev = ["data.resize_device=true", "data.target_aug_device=true"]
    assert build_device_views(load_config("tiny", [*base, *dev])).side == 32
    assert (
        build_device_views(load_config("tiny", [*base, *dev, "data.mae_same_crop=true"])).side == 37
    )


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("max_shift", [0, 3])
def test_master_crop_size(max_shift):
    views = PixelShiftViews(16, max_shift)
    (crop,) = [t for t in views.master.transforms if hasattr(t, "size")]
    assert tuple(crop.size) == (16 + max_shift, 16 + max_shift)


def smooth_image(h: int = 375, w: int = 500, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour gradients plus mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(3, generator=g) * 6.28
    rgb = torch.stack([torch.sin(4 * xx + 3 * yy + p) for p in phase]) * 100 + 128
    rgb = rgb + 4 * torch.randn(3, h, w, generator=g)
    return Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def test_crop_flip_tensor_resize_matches_pil():
    """Large crops are resized as uint8 tensors (fast); the same seed gives the same crop as the
    PIL pipeline small crops use, and pixels within one grey level of PIL's bicubic resize."""
    size = TENSOR_RESIZE_MIN + 8
    pil_first = v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(0.5),
            v2.PILToTensor(),
        ]
    )
    fast = crop_flip(size, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    assert isinstance(fast.transforms[0], v2.PILToTensor)
    assert isinstance(crop_flip(32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5).transforms[-1], v2.PILToTensor)
    for seed in range(8):
        img = smooth_image(seed=seed)
        torch.manual_seed(seed)
        a = fast(img)
        torch.manual_seed(seed)
        b = pil_first(img)
        diff = (a.int() - b.int()).abs()
        assert a.dtype == torch.uint8 and a.shape == b.shape == (3, size, size)
        mean = diff.float().mean()
        assert diff.max() <= 1 and mean < 0.05, (seed, diff.max(), mean)
