"""Detection and instance-segmentation evaluation (``cmae detect``, trained by
``cmae.train.detect``): whole-image inference on each validation image's test view (long side
resized to the training size, padded square), detections mapped back to the original image
(boxes divided by the resize factor, mask probabilities resized and thresholded at 0.5), then
pycocotools' COCOeval for box and mask AP, in percent, with each category's AP; the
predictions picture.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from cmae.data.coco import Categories, DetValSet, collate, original_size
from cmae.runtime.distributed import is_distributed, is_main, rank, world_size
from cmae.runtime.faults import worker_options

IOU_TYPES = ("bbox", "segm")
# COCOeval's summary order (stats[0:6]) under the names results.json uses
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# inference


def to_original(pred: dict[str, Tensor], factor: float, h: int, w: int) -> dict[str, Tensor]:
    """A detector's output on the test view -> boxes, scores, labels and binary uint8 masks
    [N, h, w] on the original h x w image."""
    boxes = pred["boxes"].float() / factor
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    masks = pred["masks"]  # [N, 1, S, S] probabilities on the padded view
    vh, vw = min(round(h * factor), masks.shape[-2]), min(round(w * factor), masks.shape[-1])
    if len(masks):
        masks = F.interpolate(masks[:, :, :vh, :vw].float(), size=(h, w), mode="bilinear")
    binary = (
        (masks[:, 0] >= MASK_THRESHOLD).to(torch.uint8)
        if len(masks)
        else masks.new_zeros(0, h, w, dtype=torch.uint8)
    )
    return {
        "boxes": boxes,
        "scores": pred["scores"].float(),
        "labels": pred["labels"],
        "masks": binary,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    val_set: DetValSet,
    indices: list[int],
    device: torch.device,
    amp: torch.dtype | None = None,
    batch_size: int = 2,
    workers: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Detections (on CPU, original image coordinates) of the validation images ``indices``."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        Subset(val_set, indices),
        batch_size=batch_size,
        collate_fn=collate,
        **worker_options(workers, worker_init_fn),
        # its own generator: an iterator's base seed would otherwise be drawn from the global
        # one, and evaluating would change the training's random draws (and exact resume)
        generator=torch.Generator(),
    )
    out = {}
    for imgs, factors, idx in loader:
        x = [img.to(device, non_blocking=True) for img in imgs]
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            preds = model(x)
        for pred, factor, i in zip(preds, factors, idx, strict=True):
            h, w = original_size(val_set.base, i)
            cpu = {k: v.detach().cpu() for k, v in pred.items()}
            out[i] = to_original(cpu, factor, h, w)
    model.train(was_training)
    return out


def coco_results(
    preds: dict[int, dict[str, Tensor]], image_ids: list[int], categories: Categories
) -> dict[str, list[dict]]:
    """COCO result lists (``bbox``: [x, y, w, h]; ``segm``: RLE) with the categories' own ids."""
    out: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for i, p in preds.items():
        iid = image_ids[i]
        if not len(p["scores"]):
            continue
        masks = np.asfortranarray(p["masks"].permute(1, 2, 0).numpy())
        rles = mask_utils.encode(masks)
        for box, score, label, rle in zip(
            p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), rles, strict=True
        ):
            common = {"image_id": iid, "category_id": categories.cat_id(label), "score": score}
            x1, y1, x2, y2 = box
            out["bbox"].append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            rle["counts"] = rle["counts"].decode()
            out["segm"].append({**common, "segmentation": rle})
    return out


# ---------------------------------------------------------------------------------------------
# COCOeval


def ground_truth(coco_json: dict[str, Any]) -> COCO:
    """A pycocotools COCO object from a split's json dict (its index printout silenced)."""
    gt = COCO()
    gt.dataset = coco_json
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_eval(
    gt: COCO, results: list[dict], iou_type: str, categories: Categories
) -> tuple[dict[str, float], dict[str, float]]:
    """(the six summary APs, each category's AP) in percent; with no detections all are 0
    (COCOeval's -1 'no ground truth' stays None)."""
    if not results:
        zero = {k: 0.0 for k in STAT_NAMES}
        return zero, {n: 0.0 for n in categories.names}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: _percent(v) for k, v in zip(STAT_NAMES, ev.stats[:6], strict=True)}
    precision = ev.eval["precision"]  # [IoU, recall, category, area, max dets]
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_cat[categories.names[categories.ids.index(cat_id)]] = (
            _percent(p[p > -1].mean()) if (p > -1).any() else None
        )
    return stats, per_cat


def _percent(x: float) -> float | None:
    return None if x < 0 else round(float(x) * 100, 4)


def evaluate(
    model: nn.Module,
    val_set: DetValSet,
    gt: COCO,
    categories: Categories,
    device: torch.device,
    amp: torch.dtype | None = None,
    workers: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Box and mask AP of ``model`` on the validation split: ``{"bbox": {AP, AP50, ...},
    "segm": {...}, "per_category": {"bbox": {name: AP}, "segm": {...}}}``. Each rank predicts
    every world_size-th image; rank 0 evaluates (the others get {})."""
    indices = list(range(rank(), len(val_set), world_size()))
    preds = predict(
        model, val_set, indices, device, amp, workers=workers, worker_init_fn=worker_init_fn
    )
    results = coco_results(preds, val_set.base.image_ids, categories)
    if is_distributed():
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, results)  # our own processes' result lists
        results = {t: [r for part in gathered for r in part[t]] for t in IOU_TYPES}
    if not is_main():
        return {}
    out: dict[str, Any] = {"per_category": {}}
    for t in IOU_TYPES:
        out[t], out["per_category"][t] = coco_eval(gt, results[t], t, categories)
    out["detections"] = len(results["bbox"])
    return out


# ---------------------------------------------------------------------------------------------
# the picture

COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
]


def draw_instances(
    img: Tensor, target: dict[str, Tensor], names: tuple[str, ...], height: int, thresh: float
) -> np.ndarray:
    """uint8 [H', W', 3]: ``img`` (uint8 [3, H, W]) scaled to ``height`` with the instances'
    masks (half transparent) and boxes, labelled with the class name (and the score of
    detections, those at or above ``thresh``)."""
    scale = height / img.shape[1]
    size = [height, max(1, round(img.shape[2] * scale))]
    keep = target["scores"] >= thresh if "scores" in target else slice(None)
    boxes, labels = target["boxes"][keep] * scale, target["labels"][keep]
    out = TF.resize(img, size, antialias=True)
    if len(labels):
        masks = TF.resize(target["masks"][keep], size, TF.InterpolationMode.NEAREST).bool()
        colors = [COLORS[(int(k) - 1) % len(COLORS)] for k in labels]
        text = [names[int(k) - 1] for k in labels]
        if "scores" in target:
            scores = target["scores"][keep].tolist()
            text = [f"{t} {s:.2f}" for t, s in zip(text, scores, strict=True)]
        out = draw_segmentation_masks(out, masks, alpha=0.4, colors=colors)
        out = draw_bounding_boxes(out, boxes, labels=text, colors=colors, width=2)
    return out.permute(1, 2, 0).numpy()


def write_predictions(
    model: nn.Module,
    val_set: DetValSet,
    indices: list[int],
    names: tuple[str, ...],
    device: torch.device,
    path: Path,
    score_thresh: float = 0.5,
    height: int = 240,
) -> Path:
    """Rows of prediction | ground truth for the validation images ``indices``."""
    preds = predict(model, val_set, indices, device)
    rows = []
    for i in indices:
        raw, target = val_set.base.raw(i)
        tiles = (
            draw_instances(raw, preds[i], names, height, score_thresh),
            draw_instances(raw, target, names, height, 0.0),
        )
        rows.append(np.concatenate(tiles, 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(path)
    return path
