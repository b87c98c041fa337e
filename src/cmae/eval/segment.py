"""Semantic-segmentation evaluation (``cmae segment``, trained by ``cmae.train.segment``):
sliding-window inference over each validation image rescaled to fit ``data.scale``, the averaged
logits resized to the original labels, one confusion matrix over the whole split (summed across
ranks) -> mIoU, mAcc, aAcc and per-class IoU / accuracy; the predictions picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from cmae.data.segmentation import IGNORE, SegValSet
from cmae.models.upernet import UperNet
from cmae.runtime.distributed import is_distributed, rank, world_size
from cmae.runtime.faults import worker_options
from cmae.runtime.progress import optional_progress

# ---------------------------------------------------------------------------------------------
# inference and metrics


def _pad_to(x: Tensor, h: int, w: int) -> Tensor:
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    return F.pad(x, (0, pw, 0, ph), value=0.0) if ph or pw else x


def predict_logits(model: UperNet, x: Tensor) -> Tensor:
    """Logits at the input's size; the input is padded (bottom / right, 0 after normalisation)
    to a multiple of the model's coarsest stride and the logits cropped back."""
    h, w = x.shape[-2:]
    m = model.pad_multiple
    logits = model(_pad_to(x, math.ceil(h / m) * m, math.ceil(w / m) * m))[0]
    size = (math.ceil(h / m) * m, math.ceil(w / m) * m)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :h, :w]


@torch.no_grad()
def slide_logits(model: UperNet, img: Tensor, crop: int, stride: int, batch: int = 4) -> Tensor:
    """[1, 3, H, W] -> [1, C, H, W]: ``crop`` windows every ``stride`` pixels (the last flush
    with the border; a side under ``crop`` is padded), each window's logits resized to it, the
    overlaps averaged (mmsegmentation's slide inference)."""
    h, w = img.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    out = img.new_zeros(1, model.num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        windows = torch.cat([_pad_to(img[..., a:b, c:d], crop, crop) for a, b, c, d in part])
        logits = predict_logits(model, windows).float()
        for j, (a, b, c, d) in enumerate(part):
            out[..., a:b, c:d] += logits[j : j + 1, :, : b - a, : d - c]
            count[..., a:b, c:d] += 1
    return out / count


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """[C, C] int64 counts, rows = true class, columns = predicted; IGNORE pixels left out."""
    valid = label != IGNORE
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def seg_metrics(conf: Tensor, classes: list[str]) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / accuracy from one confusion matrix.

    A class absent from the labels has no accuracy (None) and no IoU unless it was predicted
    (then IoU 0); the means skip the None entries (mmsegmentation's nanmean)."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan) * 100
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan) * 100
    total = conf.sum()

    def value(x: Tensor) -> float | None:
        return None if math.isnan(x.item()) else x.item()

    return {
        "mIoU": value(iou.nanmean()),
        "mAcc": value(acc.nanmean()),
        "aAcc": value(tp.sum() / total * 100) if total > 0 else None,
        "per_class": {
            name: {"iou": value(iou[i]), "acc": value(acc[i])} for i, name in enumerate(classes)
        },
    }


@torch.no_grad()
def evaluate(
    model: UperNet,
    val_set: SegValSet,
    crop: int,
    stride: int,
    device: torch.device,
    amp: torch.dtype | None,
    workers: int,
    worker_init_fn: Callable[[int], None] | None = None,
    progress: str | None = "cmae segment: evaluation",
) -> Tensor:
    """The confusion matrix over the whole validation split; each rank takes every
    world_size-th image and the counts are summed across ranks. ``worker_init_fn``: the
    training run's ``StopSignals.worker_init_fn`` (its workers outlive a stop signal sent to
    the whole process group while the run finishes the evaluation and saves). ``progress``:
    the label of rank 0's progress (a pass over a few seconds shows one; None: silent)."""
    was_training = model.training
    model.eval()
    mine = Subset(val_set, list(range(rank(), len(val_set), world_size())))
    loader = DataLoader(
        mine,
        batch_size=1,
        generator=torch.Generator(),
        **worker_options(workers, worker_init_fn),
    )
    conf = torch.zeros(model.num_classes, model.num_classes, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with optional_progress(mine, progress if rank() == 0 else None) as bar:
        for img, label, _ in loader:
            with autocast:
                logits = slide_logits(model, img.to(device), crop, stride)
            logits = F.interpolate(
                logits, size=label.shape[-2:], mode="bilinear", align_corners=False
            )
            conf += confusion_matrix(logits.argmax(1)[0], label[0].to(device), model.num_classes)
            bar.update(1)
    if is_distributed():
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


# ---------------------------------------------------------------------------------------------
# pictures

# distinct colours for the first classes, then fixed random ones; black is the ignore colour
BASE_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
    (0, 128, 192), (230, 25, 75), (60, 180, 75), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8: BASE_PALETTE, then colours from a fixed seed (never black)."""
    extra = np.random.default_rng(0).integers(16, 256, (max(num_classes - 20, 0), 3))
    return np.concatenate([np.array(BASE_PALETTE, np.int64), extra])[:num_classes].astype(np.uint8)


def colorize(label: Tensor, num_classes: int) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 with the palette, IGNORE black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = palette(num_classes)
    return lut[label.numpy().astype(np.uint8)]


@torch.no_grad()
def write_predictions(
    model: UperNet,
    base: Dataset,
    val_set: SegValSet,
    indices: list[int],
    crop: int,
    stride: int,
    device: torch.device,
    path: Path,
    height: int = 160,
) -> Path:
    """image | ground truth | prediction rows for the validation images ``indices``."""
    was_training = model.training
    model.eval()
    rows = []
    for i in indices:
        raw, _ = base.raw(i)
        img, label, _ = val_set[i]
        logits = slide_logits(model, img[None].to(device).float(), crop, stride)
        logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu()
        tiles = [
            raw.permute(1, 2, 0).numpy(),
            colorize(label, model.num_classes),
            colorize(pred, model.num_classes),
        ]
        h, w = label.shape
        size = (max(1, round(w * height / h)), height)
        rows.append(
            np.concatenate(
                [
                    np.asarray(Image.fromarray(t).resize(size, Image.Resampling.NEAREST))
                    for t in tiles
                ],
                axis=1,
            )
        )
    model.train(was_training)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(path)
    return path
