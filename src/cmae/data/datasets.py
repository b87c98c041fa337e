"""Datasets: an ImageFolder-style directory, or the built-in generated shapes (offline default)."""

from __future__ import annotations

import io
import math
import os
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from cmae.errors import DataError

try:  # deprecated since torchvision 0.29 (TorchCodec takes over); without it, PIL decodes all
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision that has dropped it
    decode_jpeg = None

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
)

SHAPE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "stripes",
    "checker",
    "dots",
)


# ---------------------------------------------------------------------------------------------
# built-in generated data


SYNTHETIC_COLORS = ("grey", "color")


class SyntheticShapes(Dataset):
    """Procedurally generated labelled images: one of 10 shape/texture classes with random
    scale, position, rotation, brightness and background (flat, gradient or noisy).

    ``colors``: "grey" (shape and background random grey levels; the default of the
    pretraining and evaluation commands) or "color" (random RGB colours). With random colours
    an image's two colours identify it among thousands, so self-supervised training on a few
    minutes' budget learns the colours (the shortcut SimCLR's colour ablation describes) and
    the kNN check on the shape classes stays near chance (14 % vs 11 % for random init in a
    5-minute run); in grey the colours do not tell images apart and the shape must.
    Image i is a pure function of (seed, i, colors), so the data set is reproducible without
    files. Labels are ``i % num_classes``: balanced.
    """

    def __init__(
        self,
        n: int,
        size: int = 32,
        seed: int = 0,
        transform: Callable | None = None,
        num_classes: int = len(SHAPE_CLASSES),
        colors: str = "color",
    ) -> None:
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_CLASSES)}")
        if colors not in SYNTHETIC_COLORS:
            raise ValueError(f"colors must be one of {SYNTHETIC_COLORS}, got {colors!r}")
        self.n, self.size, self.seed = n, size, seed
        self.num_classes = num_classes
        self.transform = transform
        self.colors = colors
        self.classes = list(SHAPE_CLASSES[:num_classes])

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> list[int]:
        return [i % self.num_classes for i in range(self.n)]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        label = i % self.num_classes
        img = render_shape(label, self.size, np.random.default_rng([self.seed, i]), self.colors)
        return (self.transform(img) if self.transform else img), label


class InMemory(Dataset):
    """All items of ``base`` computed once, here (the generated kNN sets with their fixed
    evaluation transform: rendered once instead of at every monitor evaluation)."""

    def __init__(self, base: Dataset) -> None:
        self.items = [base[i] for i in range(len(base))]
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _grey(rng: np.random.Generator) -> np.ndarray:
    return np.full(3, rng.integers(0, 256), dtype=np.float32)


def render_shape(
    label: int, size: int, rng: np.random.Generator, colors: str = "color"
) -> Image.Image:
    """Draw one image of class ``label`` (index into SHAPE_CLASSES) at ``size`` x ``size``."""
    return _render_shape(label, size, rng, colors)[0]


def _render_shape(
    label: int, size: int, rng: np.random.Generator, colors: str = "color"
) -> tuple[Image.Image, Image.Image]:
    ss = 4  # supersampling for anti-aliased edges
    big = size * ss
    draw_color = _grey if colors == "grey" else _color
    # background: flat colour, optionally a linear gradient, plus mild noise
    bg0, bg1 = draw_color(rng), draw_color(rng)
    t = np.linspace(0, 1, big, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    if rng.random() < 0.5:
        ramp = np.zeros_like(ramp)
    bg = bg0 + (bg1 - bg0) * ramp[..., None]
    # foreground colour far enough from the background's mean to be visible
    fg = draw_color(rng)
    for _ in range(8):
        if np.abs(fg - bg.mean((0, 1))).sum() > 150:
            break
        fg = draw_color(rng)

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.25, 0.45) * big
    cx = rng.uniform(radius, big - radius) if big > 2 * radius else big / 2
    cy = rng.uniform(radius, big - radius) if big > 2 * radius else big / 2
    rot = rng.uniform(0, 2 * math.pi)

    def poly(n_pts: int, radii: list[float]) -> list[tuple[float, float]]:
        pts = []
        for j in range(n_pts):
            a = rot + 2 * math.pi * j / n_pts
            r = radii[j % len(radii)]
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts

    def rotated(u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(rot), math.sin(rot)
        return cx + u * c - v * s, cy + u * s + v * c

    name = SHAPE_CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif name == "square":
        draw.polygon(poly(4, [radius]), fill=255)
    elif name == "triangle":
        draw.polygon(poly(3, [radius]), fill=255)
    elif name == "star":
        draw.polygon(poly(10, [radius, radius * 0.45]), fill=255)
    elif name == "cross":
        w = radius * 0.35
        for a, b in ((radius, w), (w, radius)):
            corners = [rotated(-a, -b), rotated(a, -b), rotated(a, b), rotated(-a, b)]
            draw.polygon(corners, fill=255)
    elif name == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        r2 = radius * 0.55
        draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=0)
    elif name == "hexagon":
        draw.polygon(poly(6, [radius]), fill=255)
    elif name == "stripes":
        period = radius * rng.uniform(0.35, 0.55)
        u = -radius
        while u < radius:
            corners = [
                rotated(u, -radius),
                rotated(u + period / 2, -radius),
                rotated(u + period / 2, radius),
                rotated(u, radius),
            ]
            draw.polygon(corners, fill=255)
            u += period
    elif name == "checker":
        cells = 4
        cell = 2 * radius / cells
        for a in range(cells):
            for b in range(cells):
                if (a + b) % 2 == 0:
                    u, v = -radius + a * cell, -radius + b * cell
                    corners = [
                        rotated(u, v),
                        rotated(u + cell, v),
                        rotated(u + cell, v + cell),
                        rotated(u, v + cell),
                    ]
                    draw.polygon(corners, fill=255)
    elif name == "dots":
        r = radius * 0.18
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                x, y = rotated(a * radius * 0.7, b * radius * 0.7)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)

    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    img = bg * (1 - alpha) + fg * alpha
    img = img + rng.normal(0, rng.uniform(0, 12), img.shape[:2] + (1,)).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return out.resize((size, size), Image.Resampling.LANCZOS), mask


# ---------------------------------------------------------------------------------------------
# image directories


def loader_workers(requested: int) -> int:
    """Data-loader workers actually started: ``requested``, at most the CPUs this process may
    use (more only add memory and a DataLoader warning). Results do not depend on the count:
    every sample's views are seeded by (seed, epoch, index), not by the worker."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(requested, cpus)


def list_images(root: Path) -> list[Path]:
    """All image files below ``root`` (recursive, sorted, hidden entries skipped)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return files


# Images smaller than the crop are upscaled, as RandomResizedCrop does; only a side under
# MIN_IMAGE_SIDE (1-pixel lines, tracking pixels) has nothing to crop and counts as unreadable.
MIN_IMAGE_SIDE = 2
# JPEGs above LARGE_IMAGE_PIXELS are decoded at 1/2..1/8 scale (DCT draft mode), short side
# >= DRAFT_SIDE: a 100 MP scan costs a fraction of the time and memory, crops lose nothing.
# Files over PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS) stay refused.
LARGE_IMAGE_PIXELS = 4096 * 4096
DRAFT_SIDE = 1024


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit and float grey are rescaled to 8 bits (PIL's own
    conversion would clip them); palette transparency goes through RGBA; alpha is dropped, as
    torchvision's loader does; CMYK uses PIL's conversion."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        peak = float(a.max(initial=0.0))
        if im.mode.startswith("I;16") or peak > 255:
            top = 65535.0
        else:
            top = 1.0 if im.mode == "F" and peak <= 1.0 else 255.0
        im = Image.fromarray(np.clip(np.rint(a / top * 255), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode ``path`` (or an open binary file, named ``name`` in errors) to an upright RGB
    image, or raise DataError naming the file and why."""
    label = name if name is not None else path
    try:
        with Image.open(path) as im:
            w, h = im.size
            if min(w, h) < MIN_IMAGE_SIDE:
                raise DataError(f"image {label} is {w}x{h}: too small to crop")
            if im.format == "JPEG" and w * h > LARGE_IMAGE_PIXELS:
                scale = min(w, h) / DRAFT_SIDE
                im.draft(im.mode, (int(w / scale), int(h / scale)))
            return to_rgb(ImageOps.exif_transpose(im))  # camera rotation applied
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(
            f"image {label} exceeds PIL's decompression-bomb limit ({e}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported with its path
        raise DataError(f"cannot read image {label}: {e}") from e


def load_image(path: Path, as_tensor: bool = False) -> Image.Image | Tensor:
    """``load_rgb``, or with ``as_tensor`` the same image as a uint8 [3, H, W] tensor.

    Plain JPEGs (RGB or grey, upright, ordinary size: nearly every photo) are then decoded by
    torchvision's libjpeg-turbo straight into the tensor, ~25% faster than PIL's decoder plus
    the conversion, with the same pixels (tests/test_data.py). Anything else, and any file
    torchvision cannot decode, goes through ``load_rgb``, which converts it or names the
    problem.
    """
    if as_tensor:
        x = _decode_plain_jpeg(path)
        return x if x is not None else pil_to_tensor(load_rgb(path))
    return load_rgb(path)


def _decode_plain_jpeg(path: Path) -> Tensor | None:
    """uint8 [3, H, W] for a complete, upright RGB or grey JPEG of at most
    LARGE_IMAGE_PIXELS; None for anything else (which ``load_rgb`` then handles)."""
    try:
        with Image.open(path) as im:  # the header only
            w, h = im.size
            plain = (
                im.format == "JPEG"
                and im.mode in ("RGB", "L")
                and min(w, h) >= MIN_IMAGE_SIDE
                and w * h <= LARGE_IMAGE_PIXELS
                # what ImageOps.exif_transpose reads (EXIF, or XMP without EXIF)
                and im.getexif().get(ExifTags.Base.Orientation, 1) == 1
            )
        if not plain or decode_jpeg is None:
            return None
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        with warnings.catch_warnings():  # torchvision's deprecation notice, on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - truncated, odd or unreadable: load_rgb decides and reports
        return None


def check_readable(files: list[Path], root: Path, n: int = 16) -> None:
    """Before training: at least one of ``n`` files spread over ``files`` must open (header
    only), so a directory of nothing but broken files fails here, naming it; a partial flood
    is caught while training by data.max_bad_fraction."""
    picks = files[:: max(1, len(files) // n)][:n]
    errors = []
    for f in picks:
        try:
            with Image.open(f) as im:
                if min(im.size) >= MIN_IMAGE_SIDE:
                    return
                errors.append(f"{f}: {im.size[0]}x{im.size[1]}, too small")
        except Exception as e:  # noqa: BLE001 - reported below with the path
            errors.append(f"{f}: {e}")
    raise DataError(
        f"none of the {len(picks)} images checked under {root} is usable: {'; '.join(errors[:3])}"
    )


class ImageFiles(Dataset):
    """Images below ``root``, recursively. The label is the index of the first-level folder
    (ImageFolder convention) or -1 for files directly in ``root``; pretraining ignores it.

    A transform with a true ``takes_tensor`` attribute (cmae's views for 64 px and more) gets
    the image as a uint8 [3, H, W] tensor (``load_image``), any other one a PIL RGB image.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(f"data path does not exist: {self.root}")
        if not self.root.is_dir():
            raise DataError(f"data path is not a directory: {self.root}")
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(
                f"no images found under {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        check_readable(self.files, self.root)
        tops = sorted(
            {
                f.relative_to(self.root).parts[0]
                for f in self.files
                if len(f.relative_to(self.root).parts) > 1
            }
        )
        self.classes = tops
        index = {c: i for i, c in enumerate(tops)}
        self.labels = [
            index[f.relative_to(self.root).parts[0]]
            if len(f.relative_to(self.root).parts) > 1
            else -1
            for f in self.files
        ]
        self.transform = transform
        self.as_tensor = bool(getattr(transform, "takes_tensor", False))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = load_image(self.files[i], self.as_tensor)
        return (self.transform(img) if self.transform else img), self.labels[i]

    @property
    def names(self) -> list[str]:
        """Each image's path relative to ``root`` (what ``cmae features`` stores)."""
        return [f.relative_to(self.root).as_posix() for f in self.files]


# ---------------------------------------------------------------------------------------------
# a file of paths or URLs

LIST_SUFFIXES = (".txt", ".lst", ".list")
URL_SCHEMES = ("http://", "https://", "file://")
URL_TIMEOUT = 60  # seconds per fetch; a stalled server is then a bad image, not a hang


def is_list_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in LIST_SUFFIXES


def read_list(list_file: Path) -> tuple[list[str], list[str | None]]:
    """(entries, class names or None) of a list file: one image a line, a local path (relative
    to the list file's folder, ``~`` expanded) or a URL; an optional class name after a tab;
    blank lines and lines starting with ``#`` skipped."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read list file {list_file}: {e}") from e
    entries, classes = [], []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item, _, cls = line.rstrip("\r").partition("\t")
        item = item.strip()
        if not item.startswith(URL_SCHEMES):
            path = Path(item).expanduser()
            item = str(path if path.is_absolute() else list_file.parent / path)
        entries.append(item)
        classes.append(cls.strip() or None)
    return entries, classes


def fetch(url: str) -> bytes:
    """The bytes at ``url`` (http, https, file), or DataError naming it."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as r:
            return r.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        raise DataError(f"cannot fetch {url}: {e}") from e


class ImageList(Dataset):
    """The images a list file names (``read_list``). URLs are fetched when read (never
    cached: put a folder or shards on fast storage for repeated epochs). The label is the
    class after a tab, else the image's parent folder name (``.../cat/001.jpg`` -> ``cat``),
    as an index into the sorted class names; -1 where a list has one class or none.

    Same interface as ``ImageFiles``: ``labels``, ``classes``, ``names`` (the lines' entries),
    ``takes_tensor`` transforms get a uint8 tensor; an unreadable or unreachable image raises
    DataError (so data.max_bad_fraction applies, as to a bad file in a folder).
    """

    def __init__(self, list_file: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(list_file).expanduser()
        if not self.root.is_file():
            raise DataError(f"list file does not exist: {self.root}")
        self.entries, given = read_list(self.root)
        if not self.entries:
            raise DataError(f"list file {self.root} names no images")
        local = [Path(e) for e in self.entries if not e.startswith(URL_SCHEMES)]
        missing = [p for p in local if not p.is_file()]
        if missing:
            raise DataError(
                f"list file {self.root}: {len(missing)} of {len(self.entries)} local paths do "
                f"not exist, e.g. {missing[0]}"
            )
        if len(local) == len(self.entries):
            check_readable(local, self.root)
        names = [
            c if c is not None else _parent_name(e)
            for e, c in zip(self.entries, given, strict=True)
        ]
        self.classes = sorted(set(names))
        if len(self.classes) < 2:
            self.classes, self.labels = [], [-1] * len(self.entries)
        else:
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[c] for c in names]
        self.transform = transform
        self.as_tensor = bool(getattr(transform, "takes_tensor", False))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        entry = self.entries[i]
        if entry.startswith(URL_SCHEMES):
            img = decode_bytes(fetch(entry), entry, self.as_tensor)
        else:
            img = load_image(Path(entry), self.as_tensor)
        return (self.transform(img) if self.transform else img), self.labels[i]


def _parent_name(entry: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(entry).path if "://" in entry else entry).parent.name


def decode_bytes(data: bytes, name: str, as_tensor: bool = False) -> Image.Image | Tensor:
    """An encoded image in memory (a fetched URL, a tar member) -> upright RGB PIL image or
    uint8 [3, H, W] tensor; DataError naming ``name`` when it cannot be decoded."""
    img = load_rgb(io.BytesIO(data), name)
    return pil_to_tensor(img) if as_tensor else img


def is_shards(path: str | Path | None) -> bool:
    """Whether ``--data`` names tar shards (a .tar path or pattern, or a ``pipe:`` command),
    which cmae.data.shards reads."""
    return bool(path) and (str(path).startswith("pipe:") or ".tar" in str(path))


def refuse_shards(path: str | Path) -> None:
    """A one-line DataError where tar shards reach code that needs a folder or a list file."""
    if is_shards(path):
        raise DataError(f"{path}: tar shards are not read here; pass a folder or a list file")


def open_folder_or_list(path: str | Path, transform: Callable | None = None) -> Dataset:
    """A folder (``ImageFiles``) or a list file of paths / URLs (``ImageList``)."""
    path = Path(path).expanduser()
    if path.is_file() and is_list_file(path):
        return ImageList(path, transform)
    return ImageFiles(path, transform)


class Subset(Dataset):
    """Indices into a dataset, keeping ``labels``."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.labels = [base.labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train dir, held-out dir or None) for ``root`` with train/ and val/ or test/ inside;
    for a list file with "train" in its name, itself and its twin with "val" (or "test") in
    place of "train" beside it (``train.txt`` -> ``val.txt``, ``cifar_train.txt`` ->
    ``cifar_test.txt``), when there is one."""
    if root.is_file():
        if "train" in root.name:
            for name in ("val", "test"):
                twin = root.with_name(root.name.replace("train", name))
                if twin.is_file():
                    return root, twin
        return root, None
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None


def build_datasets(
    path: str | None,
    pretrain_transform: Callable,
    eval_transform: Callable,
    synthetic: dict[str, Any],
    knn_bank: int,
    knn_queries: int,
    seed: int = 0,
) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(pretraining set, kNN bank, kNN queries); the kNN sets are None for unlabelled data.

    ``path=None`` uses the generated shapes (train and held-out sets from disjoint seeds).
    A directory with train/ and val/ (or test/) uses those splits; a plain class-folder
    directory holds out a fixed random subset as queries.
    """
    if path is None:
        n, size, s = synthetic["train"], synthetic["size"], synthetic["seed"]
        colors = synthetic.get("colors", "color")
        train = SyntheticShapes(n, size, s, pretrain_transform, colors=colors)
        # rendered once: the kNN monitor reads them at every evaluation
        bank = InMemory(SyntheticShapes(min(n, knn_bank), size, s, eval_transform, colors=colors))
        n_q = min(synthetic["val"], knn_queries)
        queries = InMemory(SyntheticShapes(n_q, size, s + 1_000_003, eval_transform, colors=colors))
        return train, bank, queries
    refuse_shards(path)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    train_dir, held_dir = split_dirs(root)
    train = open_folder_or_list(train_dir, pretrain_transform)
    if len(train.classes) < 2:
        return train, None, None  # unlabelled: no kNN check
    rng = np.random.default_rng(seed)
    bank_all = open_folder_or_list(train_dir, eval_transform)
    if held_dir is not None:
        held = open_folder_or_list(held_dir, eval_transform)
        if held.classes != bank_all.classes:
            raise DataError(f"class folders of {held_dir} differ from those of {train_dir}")
        q_idx = rng.permutation(len(held))[:knn_queries].tolist()
        b_idx = rng.permutation(len(bank_all))[:knn_bank].tolist()
        return train, Subset(bank_all, b_idx), Subset(held, q_idx)
    # no held-out split on disk: hold out 10% of the images (kept out of the bank)
    perm = rng.permutation(len(bank_all))
    n_q = min(knn_queries, max(1, len(perm) // 10))
    q_idx, b_idx = perm[:n_q].tolist(), perm[n_q : n_q + knn_bank].tolist()
    return train, Subset(bank_all, b_idx), Subset(bank_all, q_idx)
