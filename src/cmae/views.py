"""Input views (spec section 1): the pixel-shift pair for CMAE, one random crop for MAE.

Transforms return uint8 tensors; normalisation happens on the training device
(``normalize``), so host -> device copies are 4x smaller and the workers do less float work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2


def target_color_transform(
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> nn.Module:
    """Colour jitter (ops in random order) p=0.8, grayscale p=0.2, Gaussian blur p=0.5."""
    # kernel covers +-3 sigma of the widest blur; odd as torchvision requires
    kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=blur_sigma)], p=blur_p),
        ]
    )


def crop_flip(
    size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float
) -> v2.Compose:
    """RandomResizedCrop (bicubic) to ``size`` + horizontal flip -> uint8 tensor."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                size,
                scale=scale,
                ratio=ratio,
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(hflip),
            v2.PILToTensor(),
        ]
    )


class PixelShiftViews:
    """One random master crop of side S + s, flipped; online = window at (0, 0), target = window
    at (dy, dx) ~ U{0..s-1}^2, colour-augmented. Returns (online, target) as uint8 [3, S, S].

    With the colour ops off, ``target[:, y, x] == online[:, y + dy, x + dx]`` where both exist.
    """

    def __init__(
        self,
        img_size: int,
        max_shift: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        target_color: nn.Module | None = None,
    ) -> None:
        self.img_size = img_size
        self.max_shift = max_shift
        self.master = crop_flip(img_size + max_shift, scale, ratio, hflip)
        self.target_color = target_color

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        master = self.master(img)  # uint8 [3, S+s, S+s]
        s = self.img_size
        if self.max_shift > 0:
            dy, dx = torch.randint(0, self.max_shift, (2,)).tolist()
        else:
            dy = dx = 0
        online = master[:, :s, :s]
        target = master[:, dy : dy + s, dx : dx + s]
        if self.target_color is not None:
            target = self.target_color(target)
        return online.contiguous(), target.contiguous()


class SingleView:
    """MAE's view: RandomResizedCrop(S) + flip, as a 1-tuple so both modes batch alike."""

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.transform = crop_flip(img_size, scale, ratio, hflip)

    def __call__(self, img: Image.Image) -> tuple[Tensor]:
        return (self.transform(img),)


def eval_transform(img_size: int, crop_pct: float = 1.0) -> v2.Compose:
    """Deterministic view for evaluation: resize the short side to S / crop_pct, centre crop S
    (crop_pct 0.875 is the ImageNet protocol, 256 -> 224)."""
    resize = int(img_size / crop_pct)
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.PILToTensor(),
        ]
    )


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [N, 3, H, W] (any device) -> float32 normalised, computed where x lives."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s
