"""Input views (spec section 1): the pixel-shift pair for CMAE, one random crop for MAE.

Transforms return uint8 tensors; normalisation happens on the training device
(``normalize``), so host -> device copies are 4x smaller and the workers do less float work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import default_collate
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


class ColorParams(NamedTuple):
    """Per-sample parameters of the target colour ops for a batch of N images."""

    jitter: Tensor  # [N] bool, colour jitter applied
    order: Tensor  # [N, 4] long, a permutation of (brightness, contrast, saturation, hue)
    factors: Tensor  # [N, 4] float: brightness, contrast, saturation factors and hue shift
    gray: Tensor  # [N] bool
    blur: Tensor  # [N] bool
    sigma: Tensor  # [N] float, the blur's standard deviation in pixels


class DeviceTargetColor:
    """``target_color_transform`` on a whole batch on the training device (GPU), so the data
    workers only decode and crop.

    Same ops, order (random per sample), probabilities and parameter distributions as the
    per-image CPU path, drawn per sample. The uint8 rounding of torchvision's kernels is
    reproduced (each jitter op truncates to integers, the blur rounds), so for given parameters
    the output equals the CPU path's to within float rounding at integer boundaries.
    uint8 [N, 3, H, W] in and out.
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        # factor ranges as torchvision's ColorJitter: [max(0, 1 - b), 1 + b], hue [-h, h]
        self.low = (
            max(0.0, 1 - brightness),
            max(0.0, 1 - contrast),
            max(0.0, 1 - saturation),
            -hue,
        )
        self.high = (1 + brightness, 1 + contrast, 1 + saturation, hue)
        self.jitter_p, self.grayscale_p, self.blur_p = jitter_p, grayscale_p, blur_p
        self.blur_sigma = blur_sigma
        self.kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1  # as target_color_transform

    def sample(self, n: int) -> ColorParams:
        """Parameters for n images, drawn on the host (torch's CPU generator, saved with the
        training state): which images each op touches is then known without a device sync."""
        u = torch.rand(n, 8)
        low, high = torch.tensor(self.low), torch.tensor(self.high)
        lo_s, hi_s = self.blur_sigma
        return ColorParams(
            jitter=u[:, 0] < self.jitter_p,
            order=torch.rand(n, 4).argsort(dim=1),  # uniform random permutations
            factors=low + (high - low) * u[:, 1:5],
            gray=u[:, 5] < self.grayscale_p,
            blur=u[:, 6] < self.blur_p,
            sigma=lo_s + (hi_s - lo_s) * u[:, 7],
        )

    def apply(self, x: Tensor, p: ColorParams) -> Tensor:
        """uint8 [N, 3, H, W] (any device) -> uint8, with the host parameters ``p``.

        Each op runs only on the images it applies to, at its place in their order: the work is
        that of the per-image path, batched (a jitter step per (position, op), then grayscale,
        then blur).
        """
        steps = [(op, p.jitter & (p.order[:, pos] == op)) for pos in range(4) for op in range(4)]
        steps += [(4, p.gray), (5, p.blur)]
        per_op = torch.cat([p.factors, torch.zeros_like(p.sigma)[:, None], p.sigma[:, None]], 1)
        index = [sel.nonzero().flatten() for _, sel in steps]
        values = [per_op[i, op] for (op, _), i in zip(steps, index, strict=True)]
        index_d, values_d = (_to_device(torch.cat(t), x.device) for t in (index, values))
        x = x.float()
        start = 0
        for (op, _), i in zip(steps, index, strict=True):
            k = len(i)
            if k == 0:
                continue
            idx, val = index_d[start : start + k], values_d[start : start + k].view(-1, 1, 1, 1)
            start += k
            x.index_copy_(0, idx, self._op(op, x.index_select(0, idx), val))
        return x.to(torch.uint8)

    def _op(self, op: int, x: Tensor, value: Tensor) -> Tensor:
        """Op ``op`` on float 0..255 images ``x`` [K, 3, H, W] with per-image ``value``
        [K, 1, 1, 1], rounded to integers as torchvision's uint8 kernels do."""
        if op == 3:
            return _shift_hue(x, value.flatten())
        if op == 4:
            return _gray(x).floor().expand_as(x)
        if op == 5:
            return _blur(x, value.flatten(), self.kernel).round()
        # brightness, contrast, saturation: blend with black, the mean grey level, the grey
        # image (torchvision floors the grey of uint8 images); the result truncates to uint8
        if op == 0:
            base = torch.zeros_like(x[:, :1])
        elif op == 1:
            base = _gray(x).floor().mean(dim=(1, 2, 3), keepdim=True)
        else:
            base = _gray(x).floor()
        return (x * value + base * (1 - value)).clamp(0, 255).floor()

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.sample(x.shape[0]))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor to ``device`` without a sync (pinned, asynchronous on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _gray(x: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma with torchvision's weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue rotation by ``shift`` [N] (fraction of a turn) of 0..255 images, through HSV, with
    torchvision's float -> uint8 conversion (x 255.999, truncated)."""
    rgb = x / 255.0
    r, g, b = rgb.unbind(dim=1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(grey, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = (h * (1.0 / 6.0) + 1.0).fmod(1.0)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    h6 = h * 6.0
    i = h6.floor()
    f = h6 - i
    v = maxc
    vpqt = torch.stack(
        [
            v,
            (v * (1 - s)).clamp(0, 1),
            (v * (1 - s * f)).clamp(0, 1),
            (v * (1 - s * (1 - f))).clamp(0, 1),
        ],
        dim=1,
    )  # [N, 4, H, W]
    # hue sector i -> which of (v, p, q, t) is r, g and b
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])
    select = _to_device(select, x.device)[:, i.long().remainder(6)].transpose(0, 1)  # [N, 3, H, W]
    out = vpqt.gather(1, select)
    return (out * 255.999).floor()


def _blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [N], reflect padding."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    k = torch.softmax(-0.5 * (offsets / sigma.view(-1, 1)) ** 2, dim=1)  # [N, kernel]
    k = k.repeat_interleave(c, dim=0)  # [N*c, kernel], one per (sample, channel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w)


# From this output side up, crops are resized as uint8 tensors: torch's bicubic antialiased
# resize is ~2.7x faster than PIL's on a 500x375 -> 256 crop (docs/PERFORMANCE.md); on small
# images (CIFAR, 32 -> 40 px) PIL's is faster by ~0.1 ms, torch's per-call overhead.
TENSOR_RESIZE_MIN = 64


class TensorFirst(v2.Compose):
    """PILToTensor, then ops on the uint8 tensor. Takes a PIL image or an already decoded uint8
    [3, H, W] tensor: ``takes_tensor`` tells ``data.ImageFiles`` to skip the PIL image."""

    takes_tensor = True


def _resize_first_or_last(resize: list[nn.Module], size: int) -> v2.Compose:
    """``resize`` ops on the PIL image then PILToTensor, or PILToTensor first for large outputs
    (same random parameters either way; pixels within one grey level)."""
    if size >= TENSOR_RESIZE_MIN:
        return TensorFirst([v2.PILToTensor(), *resize])
    return v2.Compose([*resize, v2.PILToTensor()])


def crop_flip(
    size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float
) -> v2.Compose:
    """RandomResizedCrop (bicubic, antialiased) to ``size`` + horizontal flip -> uint8 tensor."""
    crop = v2.RandomResizedCrop(
        size, scale=scale, ratio=ratio, interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return _resize_first_or_last([crop, v2.RandomHorizontalFlip(hflip)], size)


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
        self.takes_tensor = getattr(self.master, "takes_tensor", False)

    def __call__(self, img: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
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
        return online, target  # views of the master crop; batch collation copies them


class SingleView:
    """MAE's view: RandomResizedCrop(S) + flip, as a 1-tuple so both modes batch alike.

    ``max_shift`` s > 0 gives MAE the online view of CMAE's geometry instead: a master crop of
    side S + s and its S x S window at (0, 0) (``data.mae_same_crop``), so that MAE and CMAE
    see the same crops and differ only in what CMAE adds."""

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        max_shift: int = 0,
    ) -> None:
        self.img_size = img_size
        self.transform = crop_flip(img_size + max_shift, scale, ratio, hflip)
        self.takes_tensor = getattr(self.transform, "takes_tensor", False)

    def __call__(self, img: Image.Image | Tensor) -> tuple[Tensor]:
        s = self.img_size
        return (self.transform(img)[:, :s, :s],)


class CropBoxes:
    """The data workers' part of the views under ``data.resize_device``: draw the random
    resized crop's box, the flip and the shift exactly as ``PixelShiftViews`` / ``SingleView``
    draw them (``max_shift=0``: MAE) and cut the box out of the decoded image; ``collate_boxes``
    packs a batch of boxes into one buffer and ``DeviceViews`` resizes, flips and windows them
    on the training device. A worker's work per image is then the JPEG decode and one copy.

    Returns (box uint8 [3, h, w], a window of the image; int64 [3] (flip, dy, dx)).
    """

    takes_tensor = True

    def __init__(
        self,
        img_size: int,
        max_shift: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.max_shift, self.hflip = max_shift, hflip
        # only its parameter draws are used; the resize is DeviceViews'
        self.crop = v2.RandomResizedCrop(img_size + max_shift, scale=scale, ratio=ratio)

    def __call__(self, img: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        x = img if isinstance(img, Tensor) else v2.functional.pil_to_tensor(img)
        box = self.crop.make_params([x])  # top, left, height, width: RandomResizedCrop's draws
        # RandomHorizontalFlip's draw (made for any p; it flips when rand < p), then the shift
        flip = int(torch.rand(1).item() < self.hflip)
        dy, dx = torch.randint(0, self.max_shift, (2,)).tolist() if self.max_shift > 0 else (0, 0)
        top, left, h, w = box["top"], box["left"], box["height"], box["width"]
        return x[:, top : top + h, left : left + w], torch.tensor([flip, dy, dx])


def collate_boxes(batch: list[tuple]) -> tuple:
    """``default_collate`` for samples whose first item is ``CropBoxes``' (box, params): the
    boxes (all sizes) are packed, each as height x width x channels, into one uint8 buffer,
    so a batch crosses from a worker and to the device as one tensor; the first item becomes
    (buffer, sizes [N, 2], params [N, 3])."""
    boxes = [sample[0][0] for sample in batch]
    sizes = torch.tensor([b.shape[1:] for b in boxes], dtype=torch.int64)
    buffer = torch.empty(int(sizes.prod(1).sum()) * 3, dtype=torch.uint8)
    start = 0
    for b in boxes:
        n = b.numel()
        buffer[start : start + n].view(b.shape[1], b.shape[2], 3).copy_(b.permute(1, 2, 0))
        start += n
    params, *rest = default_collate([(sample[0][1], *sample[1:]) for sample in batch])
    return ((buffer, sizes, params), *rest)


class DeviceViews:
    """``collate_boxes``' (buffer, sizes, params) -> the uint8 views [N, 3, S, S] on ``device``:
    each box resized to S + s (bicubic, antialiased, as RandomResizedCrop), flipped, then the
    online window at (0, 0) and, with ``two_views``, the target window at (dy, dx).

    On the CPU, for views of TENSOR_RESIZE_MIN px and more, the result equals the workers' own
    views bit for bit (the same resize kernel); smaller views (which the workers resize with
    PIL) and GPUs (torchvision resizes uint8 through float32 there) are within one grey level.
    """

    def __init__(self, img_size: int, max_shift: int, two_views: bool) -> None:
        self.img_size, self.side, self.two_views = img_size, img_size + max_shift, two_views

    def __call__(
        self, buffer: Tensor, sizes: Tensor, params: Tensor, device: torch.device
    ) -> list[Tensor]:
        n, s = len(sizes), self.img_size
        buffer = buffer.to(device, non_blocking=True)  # one copy for the whole batch
        views = [torch.empty(n, 3, s, s, dtype=torch.uint8, device=device)]
        if self.two_views:
            views.append(torch.empty_like(views[0]))
        start = 0
        boxes = zip(sizes.tolist(), params.tolist(), strict=True)
        for k, ((h, w), (flip, dy, dx)) in enumerate(boxes):
            box = buffer[start : start + h * w * 3].view(h, w, 3).permute(2, 0, 1)
            start += h * w * 3
            m = v2.functional.resize(
                box, [self.side, self.side], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
            m = m.flip(-1) if flip else m
            views[0][k] = m[:, :s, :s]
            if self.two_views:
                views[1][k] = m[:, dy : dy + s, dx : dx + s]
        return views


def eval_transform(img_size: int, crop_pct: float = 1.0) -> v2.Compose:
    """Deterministic view for evaluation: resize the short side to S / crop_pct, centre crop S
    (crop_pct 0.875 is the ImageNet protocol, 256 -> 224)."""
    resize = int(img_size / crop_pct)
    ops = [
        v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
    ]
    return _resize_first_or_last(ops, img_size)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [N, 3, H, W] (any device) -> float32 normalised, computed where x lives."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s
