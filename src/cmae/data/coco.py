"""Instance data for ``cmae detect``: the COCO layout, the ViTDet pipelines and a generated set
(the offline default).

Layout: ``ROOT/images/{train,val}/`` with ``ROOT/annotations/instances_{train,val}.json``, or
COCO 2017's names (``ROOT/train2017/``, ``ROOT/val2017/``, ``ROOT/annotations/
instances_train2017.json``; images also under ``ROOT/images/train2017/``). Masks are polygons or
RLE (pycocotools), boxes ``[x, y, w, h]`` (converted to ``x1, y1, x2, y2``). Category ids are
mapped to contiguous labels 1..K in id order (0 is the background of torchvision's detectors)
and back for evaluation. ``iscrowd`` regions are left out of the training targets and kept in
the evaluation's ground truth, where COCOeval ignores detections that fall on them. Images
without annotations stay (negatives).

Bad input (a missing image, an image whose size differs from the json, a box outside its image,
a mask empty after decoding, an unknown category) is found when the split is built and named
with its file or annotation id. Up to ``max_bad_fraction`` of the images (and, separately, of the
annotations) may be bad: those are left out and counted; beyond it the first one is the error.
An image file that fails to decode is reported when it is read.

Training pipeline (ViTDet's large-scale jitter): resize by U(0.1, 2.0) x the factor that fits
the image in ``size`` x ``size``, a random ``size`` crop (smaller sides kept whole), horizontal
flip (torchvision.transforms.v2 on tv_tensors, so image, masks and boxes move together), boxes
recomputed from the cropped masks (ViTDet's ``recompute_boxes``), instances left empty dropped,
the image padded bottom / right to ``size`` with the mean colour. Test pipeline: long side
resized to ``size``, padded the same way. Images are float 0..1; the model normalises them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cmae.data import dense_shapes
from cmae.data.datasets import load_image
from cmae.data.sampling import sample_seed
from cmae.errors import DataError

SPLITS = ("train", "val")
BOX_TOLERANCE = 1.0  # pixels a box may pass the image border (rounding in exported json)


# ---------------------------------------------------------------------------------------------
# the COCO layout


def split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(image directory, annotation file) of ``split`` under ``root``: the short names
    (``images/train``, ``instances_train.json``) or COCO 2017's (``train2017``)."""
    ann_dir = root / "annotations"
    for name in (split, f"{split}2017"):
        ann = ann_dir / f"instances_{name}.json"
        if not ann.is_file():
            continue
        for img_dir in (root / "images" / name, root / name):
            if img_dir.is_dir():
                return img_dir, ann
        raise DataError(f"{ann}: no image directory {root / 'images' / name} (or {root / name})")
    raise DataError(
        f"{ann_dir / f'instances_{split}.json'}: not found (COCO layout: ROOT/images/"
        f"{{train,val}}/ + ROOT/annotations/instances_{{train,val}}.json, or the 2017 names)"
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not COCO instances json (needs 'images', 'categories')")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataError(f"{path}: no 'categories'")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


@dataclass(frozen=True)
class Categories:
    """COCO category ids (sorted) <-> contiguous labels 1..K."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_json(cls, cats: list[dict], where: Path | str) -> Categories:
        try:
            pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: a category without an integer id and a name") from e
        ids = tuple(i for i, _ in pairs)
        if len(set(ids)) != len(ids):
            raise DataError(f"{where}: repeated category ids")
        return cls(ids, tuple(n for _, n in pairs))

    def label(self, cat_id: int) -> int | None:
        try:
            return self.ids.index(cat_id) + 1
        except ValueError:
            return None

    def cat_id(self, label: int) -> int:
        return self.ids[label - 1]

    def as_json(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names, strict=True)]


def decode_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE with list or string counts) -> uint8 [h, w]."""
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects(segm, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    return mask_utils.decode(rle)


def segmentation_problem(segm: Any, h: int, w: int) -> str | None:
    """Why ``segm`` is not a usable mask of an h x w image, or None."""
    if isinstance(segm, list):
        # a 4-number polygon would be read as a box by pycocotools
        if not segm or any(
            not isinstance(p, list)
            or len(p) < 6
            or len(p) % 2
            or not all(isinstance(v, (int, float)) for v in p)
            for p in segm
        ):
            return "a polygon with fewer than 3 points or an odd number of coordinates"
        return None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            return f"an RLE of size {segm['size']} on a {h}x{w} image (h x w)"
        return None
    return "no segmentation (polygons or RLE)"


class CocoSplit(Dataset):
    """One split of a COCO-layout directory. ``raw(i)`` -> (uint8 [3, H, W] image, target:
    ``boxes`` float [N, 4] xyxy, ``labels`` int64 [N] in 1..K, ``masks`` uint8 [N, H, W]) of
    the non-crowd instances. ``coco_json()`` is the split's ground truth as kept (crowd
    included), for COCOeval. ``bad``: the images and annotations left out, counted."""

    def __init__(
        self,
        img_dir: Path,
        ann_file: Path,
        categories: Categories | None = None,
        max_bad_fraction: float = 0.0,
    ) -> None:
        data = read_json(ann_file)
        self.img_dir, self.ann_file = img_dir, ann_file
        own = Categories.from_json(data["categories"], ann_file)
        if categories is not None and categories != own:
            raise DataError(
                f"{ann_file}: categories differ from the training split's ({len(own.ids)} vs "
                f"{len(categories.ids)}; ids and names must match)"
            )
        self.categories = own
        images, bad_images = self._check_images(data["images"])
        anns, bad_anns = self._check_annotations(data.get("annotations", []), images)
        self.bad = {"images": len(bad_images), "annotations": len(bad_anns)}
        for kind, bad, total in (
            ("images", bad_images, len(data["images"])),
            ("annotations", bad_anns, len(data.get("annotations", []))),
        ):
            if bad and len(bad) > max_bad_fraction * total:
                more = f" ({len(bad)} of {total} {kind} bad)" if len(bad) > 1 else ""
                raise DataError(
                    f"{bad[0]}{more}; data.max_bad_fraction={max_bad_fraction:g} allows leaving "
                    "out a fraction of them"
                )
        self.problems = bad_images + bad_anns  # the messages, for the run's summary
        self.images = images
        self.anns = anns  # image id -> its annotations (crowd included)
        if not self.images:
            raise DataError(f"{ann_file}: no usable images")

    def _check_images(self, entries: list) -> tuple[list[dict], list[str]]:
        ok, bad, seen = [], [], set()
        for e in entries:
            try:
                iid, name, h, w = (
                    int(e["id"]),
                    str(e["file_name"]),
                    int(e["height"]),
                    int(e["width"]),
                )
            except (KeyError, TypeError, ValueError):
                bad.append(f"{self.ann_file}: an image entry without id, file_name, height, width")
                continue
            if iid in seen:
                bad.append(f"{self.ann_file}: image id {iid} repeated")
                continue
            path = self.img_dir / name
            problem = image_problem(path, h, w)
            if problem:
                bad.append(problem)
                continue
            seen.add(iid)
            ok.append({"id": iid, "file_name": name, "height": h, "width": w})
        return ok, bad

    def _check_annotations(
        self, entries: list, images: list[dict]
    ) -> tuple[dict[int, list[dict]], list[str]]:
        sizes = {im["id"]: (im["height"], im["width"]) for im in images}
        out: dict[int, list[dict]] = {im["id"]: [] for im in images}
        bad = []
        for a in entries:
            aid = a.get("id", "?") if isinstance(a, dict) else "?"
            where = f"{self.ann_file}: annotation {aid}"
            try:
                iid, cat = int(a["image_id"]), int(a["category_id"])
                x, y, bw, bh = (float(v) for v in a["bbox"])
            except (KeyError, TypeError, ValueError):
                bad.append(f"{where}: needs image_id, category_id and a 4-number bbox")
                continue
            if iid not in sizes:
                continue  # its image is left out (or was never listed): nothing to train on
            h, w = sizes[iid]
            if self.categories.label(cat) is None:
                bad.append(f"{where}: unknown category {cat}")
                continue
            t = BOX_TOLERANCE
            if bw <= 0 or bh <= 0 or x < -t or y < -t or x + bw > w + t or y + bh > h + t:
                bad.append(f"{where}: box {a['bbox']} is empty or outside its {w}x{h} image")
                continue
            segm = a.get("segmentation")
            problem = segmentation_problem(segm, h, w)
            if problem is None and not decode_mask(segm, h, w).any():
                problem = "a mask that is empty after decoding"
            if problem:
                bad.append(f"{where}: {problem}")
                continue
            crowd = int(bool(a.get("iscrowd", 0)))
            x1, y1 = max(x, 0.0), max(y, 0.0)
            box = [x1, y1, min(x + bw, w) - x1, min(y + bh, h) - y1]
            out[iid].append(
                {
                    "id": int(a["id"]) if "id" in a else len(bad) + sum(map(len, out.values())),
                    "image_id": iid,
                    "category_id": cat,
                    "bbox": box,
                    "area": float(a.get("area", bw * bh)),
                    "iscrowd": crowd,
                    "segmentation": segm,
                }
            )
        return out, bad

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]

    def raw(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        im = self.images[i]
        path, h, w = self.img_dir / im["file_name"], im["height"], im["width"]
        img = load_image(path, as_tensor=True)
        if tuple(img.shape[1:]) != (h, w):
            raise DataError(
                f"{path}: image is {img.shape[2]}x{img.shape[1]} but {self.ann_file.name} says "
                f"{w}x{h}"
            )
        anns = [a for a in self.anns[im["id"]] if not a["iscrowd"]]
        return img, instances(
            [a["bbox"] for a in anns],
            [self.categories.label(a["category_id"]) for a in anns],
            [decode_mask(a["segmentation"], h, w) for a in anns],
            h,
            w,
        )

    def coco_json(self) -> dict[str, Any]:
        anns = [a for im in self.images for a in self.anns[im["id"]]]
        return {"images": self.images, "annotations": anns, "categories": self.categories.as_json()}


def image_problem(path: Path, h: int, w: int) -> str | None:
    """Why image ``path`` cannot be the json's h x w entry (from its header only), or None."""
    if not path.is_file():
        return f"{path}: image not found"
    try:
        with Image.open(path) as im:
            size = im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported with its path
        return (
            f"{path}: cannot read image: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        )
    if size != (w, h):
        return f"{path}: image is {size[0]}x{size[1]} but the json says {w}x{h}"
    return None


def instances(
    boxes_xywh: list, labels: list, masks: list[np.ndarray], h: int, w: int
) -> dict[str, Tensor]:
    """The target dict torchvision's detectors take."""
    boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": m}


# ---------------------------------------------------------------------------------------------
# generated instances (the offline default)


class GeneratedInstances(Dataset):
    """Offline instance data: ``cmae.data.dense_shapes``' scenes (1-3 large textured shapes of
    3 classes on grey, each instance's visible mask). Image i is a pure function of
    (seed, i, colors); ``coco_json()`` encodes the masks as RLE."""

    def __init__(self, n: int, size: int, seed: int, colors: str = "color") -> None:
        if size < 16:
            raise DataError(f"generated detection images need a size >= 16, got {size}")
        self.n, self.size, self.seed, self.colors = n, size, seed, colors
        names = tuple(dense_shapes.CLASSES)
        self.categories = Categories(tuple(range(1, len(names) + 1)), names)
        self.bad = {"images": 0, "annotations": 0}
        self.problems: list[str] = []

    def __len__(self) -> int:
        return self.n

    @property
    def image_ids(self) -> list[int]:
        return list(range(1, self.n + 1))

    def draw(self, i: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        """(uint8 [H, W, 3] image, labels 1..K, uint8 [H, W] masks) of scene ``i``."""
        scene = dense_shapes.sample(self.size, self.seed, i, self.colors)
        labels = [cls for cls, _ in scene.instances]
        masks = [m.astype(np.uint8) for _, m in scene.instances]
        return np.array(scene.image.convert("RGB")), labels, masks

    def raw(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        pix, labels, masks = self.draw(i)
        boxes = [mask_box_xywh(m) for m in masks]
        img = torch.from_numpy(pix).permute(2, 0, 1).contiguous()
        return img, instances(boxes, labels, masks, self.size, self.size)

    def coco_json(self) -> dict[str, Any]:
        images, anns = [], []
        for i, iid in enumerate(self.image_ids):
            images.append(
                {"id": iid, "file_name": f"{i}.png", "height": self.size, "width": self.size}
            )
            _, labels, masks = self.draw(i)
            for label, m in zip(labels, masks, strict=True):
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode()
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": iid,
                        "category_id": self.categories.cat_id(label),
                        "bbox": mask_box_xywh(m),
                        "area": float(m.sum()),
                        "iscrowd": 0,
                        "segmentation": rle,
                    }
                )
        return {"images": images, "annotations": anns, "categories": self.categories.as_json()}


def mask_box_xywh(m: np.ndarray) -> list[float]:
    """The tight box of a non-empty mask, [x, y, w, h] in pixel edges."""
    ys, xs = np.nonzero(m)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def detection_splits(
    path: str | None, synthetic: dict[str, Any], max_bad_fraction: float = 0.0
) -> tuple[Dataset, Dataset]:
    """(training split, validation split) of ``path`` (COCO layout) or of the generated data
    (``path=None``); the validation categories must equal the training ones."""
    if path is None:
        size, seed, colors = synthetic["size"], synthetic["seed"], synthetic["colors"]
        return (
            GeneratedInstances(synthetic["train"], size, seed, colors),
            GeneratedInstances(synthetic["val"], size, seed + 1, colors),
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data path does not exist: {root}")
    train = CocoSplit(*split_paths(root, "train"), None, max_bad_fraction)
    val = CocoSplit(*split_paths(root, "val"), train.categories, max_bad_fraction)
    return train, val


# ---------------------------------------------------------------------------------------------
# pipelines


def pad_to(img: Tensor, size: int, fill: tuple[float, ...]) -> Tensor:
    """float [3, h, w] -> [3, size, size], padded bottom / right with ``fill`` per channel."""
    ph, pw = size - img.shape[1], size - img.shape[2]
    if not (ph or pw):
        return img
    out = torch.tensor(fill, dtype=img.dtype).view(3, 1, 1).repeat(1, size, size)
    out[:, : img.shape[1], : img.shape[2]] = img
    return out


class LargeScaleJitter:
    """ViTDet's training pipeline (module doc); random draws from torch's generator."""

    def __init__(
        self,
        size: int,
        scale_range: tuple[float, float],
        hflip: float,
        mean: tuple[float, ...],
    ) -> None:
        self.size, self.hflip, self.mean = size, hflip, tuple(mean)
        self.resize = v2.ScaleJitter((size, size), scale_range, antialias=True)

    def __call__(self, img: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x = tv_tensors.Image(img)
        masks = tv_tensors.Mask(target["masks"])
        x, masks = self.resize(x, masks)
        h, w = x.shape[1:]
        s = self.size
        top = int(torch.randint(max(h - s, 0) + 1, ()).item())
        left = int(torch.randint(max(w - s, 0) + 1, ()).item())
        x = TF.crop(x, top, left, min(s, h), min(s, w))
        masks = TF.crop(masks, top, left, min(s, h), min(s, w))
        if float(torch.rand(())) < self.hflip:
            x, masks = TF.horizontal_flip(x), TF.horizontal_flip(masks)
        masks = masks.as_subclass(Tensor)
        keep = masks.flatten(1).amax(1) > 0 if len(masks) else torch.zeros(0, dtype=torch.bool)
        masks = masks[keep]
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel edges
        out = pad_to(x.as_subclass(Tensor).float() / 255, s, self.mean)
        masks = F.pad(masks, (0, s - masks.shape[2], 0, s - masks.shape[1]))
        return out, {"boxes": boxes, "labels": target["labels"][keep], "masks": masks}


def eval_view(img: Tensor, size: int, mean: tuple[float, ...]) -> tuple[Tensor, float]:
    """uint8 [3, H, W] -> (float [3, size, size]: long side resized to ``size``, padded bottom /
    right with the mean; the resize factor)."""
    h, w = img.shape[1:]
    factor = size / max(h, w)
    nh, nw = min(size, round(h * factor)), min(size, round(w * factor))
    x = TF.resize(img, [nh, nw], antialias=True) if (nh, nw) != (h, w) else img
    return pad_to(x.float() / 255, size, mean), factor


class DetTrainSet(Dataset):
    """``base`` through ``pipeline``, indexed by (epoch, index) keys (``EpochSampler``): each
    sample's draws come from a generator seeded by (seed, epoch, index), whichever worker loads
    it, and the main process's generator is left untouched."""

    def __init__(self, base: Dataset, pipeline: LargeScaleJitter, seed: int) -> None:
        self.base, self.pipeline, self.seed = base, pipeline, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        epoch, index = key
        img, target = self.base.raw(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.pipeline(img, target)


class DetValSet(Dataset):
    """``base`` for evaluation: (test view, resize factor, index)."""

    def __init__(self, base: Dataset, size: int, mean: tuple[float, ...]) -> None:
        self.base, self.size, self.mean = base, size, tuple(mean)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, float, int]:
        img, _ = self.base.raw(i)
        x, factor = eval_view(img, self.size, self.mean)
        return x, factor, i


def collate(batch: list) -> tuple[list, ...]:
    """Lists, not stacked: targets differ in length (torchvision's detectors take lists)."""
    return tuple(map(list, zip(*batch, strict=True)))


def original_size(base: Dataset, i: int) -> tuple[int, int]:
    """(h, w) of image ``i`` of a split without decoding it."""
    if isinstance(base, GeneratedInstances):
        return base.size, base.size
    im = base.images[i]
    return im["height"], im["width"]
