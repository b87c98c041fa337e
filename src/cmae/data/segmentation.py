"""Semantic-segmentation data: the ADE20K directory layout, the reference pipelines and a
generated set (the offline default, ``cmae.data.dense_shapes``).

Layout: ``ROOT/images/{training,validation}/NAME.jpg`` with ``ROOT/annotations/<split>/NAME.png``
(8-bit label maps) and optionally ``ROOT/classes.txt`` (one class name per line, in label
order). ``reduce_zero_label`` (ADE20K, CamVid here): 0 is "other" and ignored, class k is
k - 1, 255 stays ignored (``IGNORE``).

Training pipeline (mmsegmentation's ADE20K one): rescale keeping the aspect ratio to fit
``scale`` x r with r ~ U(ratio_range) (reference (2048, 512), 0.5-2.0), a random ``crop``
square whose most frequent class covers under ``cat_max_ratio`` of its labelled pixels (10
tries), horizontal flip, photometric distortion, normalisation, padding to the crop (image 0
after normalisation, labels ``IGNORE``). Validation: rescale to fit ``scale`` (short side 512,
long side at most 2048), labels at the original size. Each training sample's randomness is
seeded from (seed, epoch, index) (``cmae.data.sampling.sample_seed``), so a resumed run draws the
same crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cmae.data import dense_shapes
from cmae.data.datasets import DataError, load_image
from cmae.data.sampling import sample_seed

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("training", "validation")
# photometric distortion of the reference (mmsegmentation PhotoMetricDistortion)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units (0-180)
CROP_TRIES = 10


def read_classes(root: Path) -> list[str] | None:
    """Class names from ``ROOT/classes.txt`` (one per line, blank lines skipped), or None."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    return names


class SegFolder(Dataset):
    """One split of an ADE20K-layout directory: ``raw(i)`` -> (uint8 [3, H, W] image, uint8
    [H, W] labels in 0..num_classes-1 or IGNORE). A missing annotation or an empty split is
    reported when the set is built; a label map of the wrong size or with a label outside
    the classes when the sample is read, each naming the file."""

    def __init__(self, root: Path, split: str, num_classes: int, reduce_zero_label: bool) -> None:
        self.root, self.split = root, split
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        if not img_dir.is_dir():
            raise DataError(
                f"{img_dir}: no such directory (ADE20K layout: ROOT/images/{{training,validation}}"
                "/*.jpg and ROOT/annotations/{training,validation}/*.png)"
            )
        self.images = sorted(
            p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.images:
            raise DataError(f"{img_dir}: empty split, no images ({', '.join(IMAGE_SUFFIXES)})")
        self.labels = [ann_dir / f"{p.stem}.png" for p in self.images]
        for img, ann in zip(self.images, self.labels, strict=True):
            if not ann.is_file():
                raise DataError(f"{img}: missing annotation {ann}")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return self.images[i].name

    def raw(self, i: int) -> tuple[Tensor, Tensor]:
        img = load_image(self.images[i], as_tensor=True)
        path = self.labels[i]
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P"):
                    raise DataError(f"{path}: label map in mode {im.mode}, expected 8-bit (L or P)")
                label = np.asarray(im, dtype=np.uint8).copy()
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported with its path
            raise DataError(f"cannot read label map {path}: {e}") from e
        if label.shape != tuple(img.shape[1:]):
            raise DataError(
                f"{path}: label map is {label.shape[1]}x{label.shape[0]} but its image "
                f"{self.images[i].name} is {img.shape[2]}x{img.shape[1]}"
            )
        label = torch.from_numpy(label)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        bad = label[(label != IGNORE) & (label >= self.num_classes)]
        if bad.numel():
            raw = int(bad.max()) + (1 if self.reduce_zero_label else 0)
            raise DataError(
                f"{path}: label {raw} is outside the {self.num_classes} classes"
                f"{' (reduce_zero_label: labels 1..num_classes)' if self.reduce_zero_label else ''}"
            )
        return img, label


def reduce_zero_label(label: Tensor) -> Tensor:
    """ADE20K's convention: 0 ("other") -> IGNORE, k -> k - 1, IGNORE stays IGNORE."""
    out = label.to(torch.int16) - 1
    out[(label == 0) | (label == IGNORE)] = IGNORE
    return out.to(torch.uint8)


class GeneratedSegmentation(Dataset):
    """Offline segmentation data: the dense-shapes scenes (``cmae.data.dense_shapes``: a few
    large shapes of 3 textured classes on a grey background); every pixel's label is its
    visible shape's class, or 0 (background, a class here). Image i is a pure function of
    (seed, i, colors) (``colors``: "color", or "grey", the same scenes in grey levels)."""

    classes = ["background", *dense_shapes.CLASSES]

    def __init__(self, n: int, size: int, seed: int, colors: str = "color") -> None:
        if size < 16:
            raise DataError(f"generated segmentation images need a size >= 16, got {size}")
        self.n, self.size, self.seed, self.colors = n, size, seed, colors
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"generated-{self.seed}-{i}"

    def raw(self, i: int) -> tuple[Tensor, Tensor]:
        scene = dense_shapes.sample(self.size, self.seed, i, self.colors)
        img = torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1).contiguous()
        return img, torch.from_numpy(dense_shapes.semantic_labels(scene))


# ---------------------------------------------------------------------------------------------
# pipelines


def fit_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(h, w) rescaled, keeping the ratio, to fit ``scale`` = (long side, short side) limits
    (mmcv's ``imrescale``: the largest factor under both)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_pair(img: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear image (no antialiasing, as OpenCV's), nearest labels."""
    if tuple(img.shape[1:]) == size:
        return img, label
    img = TF.resize(img, list(size), TF.InterpolationMode.BILINEAR, antialias=False)
    label = TF.resize(label[None], list(size), TF.InterpolationMode.NEAREST)[0]
    return img, label


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def random_crop(
    img: Tensor, label: Tensor, crop: int, cat_max_ratio: float
) -> tuple[Tensor, Tensor]:
    """A ``crop`` square (smaller sides kept whole) whose largest labelled class covers less
    than ``cat_max_ratio`` of its labelled pixels, in at most ``CROP_TRIES`` draws."""
    h, w = label.shape

    def draw() -> tuple[int, int]:
        y = int(torch.randint(max(h - crop, 0) + 1, ()).item())
        x = int(torch.randint(max(w - crop, 0) + 1, ()).item())
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            window = label[y : y + crop, x : x + crop]
            counts = torch.bincount(window[window != IGNORE].long().flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[:, y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]


def photometric_distortion(img: Tensor) -> Tensor:
    """float [3, H, W] in 0..255 -> distorted, each op with probability 0.5: brightness
    (+U(-32, 32)), contrast (x U(0.5, 1.5), before or after the colour ops), saturation
    (x U(0.5, 1.5)) and hue (+U{-18..17} of 180). The reference scales S and shifts H in
    OpenCV's HSV space on uint8; here saturation blends with the grey image and hue rotates in
    torchvision's HSV, on floats."""
    if _coin():
        img = (img + _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 255)
    contrast_first = _coin()

    def contrast(x: Tensor) -> Tensor:
        return (x * _uniform(*CONTRAST_RANGE)).clamp(0, 255) if _coin() else x

    if contrast_first:
        img = contrast(img)
    if _coin():
        img = TF.adjust_saturation(img / 255, _uniform(*SATURATION_RANGE)) * 255
    if _coin():
        delta = int(torch.randint(-HUE_DELTA, HUE_DELTA, ()).item())
        img = TF.adjust_hue(img / 255, delta / 180) * 255
    if not contrast_first:
        img = contrast(img)
    return img


def normalize_255(img: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 or float 0..255 [3, H, W] -> float32 normalised with 0..1 ``mean`` / ``std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (img.float() / 255 - m) / s


class TrainPipeline:
    """The reference training pipeline (module doc); random draws from torch's generator."""

    def __init__(
        self,
        scale: tuple[int, int],
        ratio_range: tuple[float, float],
        crop: int,
        cat_max_ratio: float,
        hflip: float,
        photometric: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.scale, self.ratio_range, self.crop = scale, ratio_range, crop
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std = mean, std

    def __call__(self, img: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        r = _uniform(*self.ratio_range)
        target = (int(self.scale[0] * r), int(self.scale[1] * r))
        img, label = resize_pair(img, label, fit_size(*label.shape, target))
        img, label = random_crop(img, label, self.crop, self.cat_max_ratio)
        if float(torch.rand(())) < self.hflip:
            img, label = img.flip(-1), label.flip(-1)
        x = img.float()
        if self.photometric:
            x = photometric_distortion(x)
        x = normalize_255(x, self.mean, self.std)
        ph, pw = self.crop - x.shape[1], self.crop - x.shape[2]
        if ph or pw:  # bottom / right padding: 0 after normalisation, ignored labels
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
        return x, label


class SegTrainSet(Dataset):
    """``base`` through ``pipeline``, indexed by (epoch, index) keys (``EpochSampler``): each
    sample's draws come from a generator seeded by (seed, epoch, index), whichever worker loads
    it, and the main process's generator is left untouched."""

    def __init__(self, base: Dataset, pipeline: TrainPipeline, seed: int) -> None:
        self.base, self.pipeline, self.seed = base, pipeline, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = key
        img, label = self.base.raw(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.pipeline(img, label)


class SegValSet(Dataset):
    """``base`` for evaluation: (normalised image rescaled to fit ``scale``, labels at the
    original size, index)."""

    def __init__(
        self, base: Dataset, scale: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.base, self.scale, self.mean, self.std = base, scale, mean, std

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        img, label = self.base.raw(i)
        size = fit_size(*label.shape, self.scale)
        if tuple(img.shape[1:]) != size:
            img = TF.resize(img, list(size), TF.InterpolationMode.BILINEAR, antialias=False)
        return normalize_255(img, self.mean, self.std), label, i


def segmentation_splits(
    path: str | None,
    num_classes: int | None,
    reduce_zero_label: bool,
    synthetic: dict[str, int],
) -> tuple[Dataset, Dataset, list[str]]:
    """(training split, validation split, class names) of ``path`` (ADE20K layout) or of the
    generated data (``path=None``). ``num_classes``: None takes ROOT/classes.txt."""
    if path is None:
        size, seed, colors = synthetic["size"], synthetic["seed"], synthetic["colors"]
        train = GeneratedSegmentation(synthetic["train"], size, seed, colors)
        val = GeneratedSegmentation(synthetic["val"], size, seed + 1, colors)
        if num_classes is not None and num_classes != train.num_classes:
            raise DataError(
                f"data.num_classes: the generated data has {train.num_classes} classes, "
                f"got {num_classes}"
            )
        return train, val, list(train.classes)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data path does not exist: {root}")
    names = read_classes(root)
    if num_classes is None:
        if names is None:
            raise DataError(f"{root}: no classes.txt; set data.num_classes")
        num_classes = len(names)
    elif names is not None and len(names) != num_classes:
        raise DataError(
            f"data.num_classes: {num_classes}, but {root / 'classes.txt'} names {len(names)}"
        )
    names = names or [f"class_{i}" for i in range(num_classes)]
    train, val = (SegFolder(root, s, num_classes, reduce_zero_label) for s in SPLITS)
    return train, val, names
