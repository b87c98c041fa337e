"""The fine-tuning recipe of MAE / CMAE (spec section 5), which ``cmae finetune``
(``cmae.train.finetune``: the loop, checkpoints, resume) and ``cmae segment`` use.

A timm ``VisionTransformer`` carries the pretrained encoder (same key names) with a global-pool
+ fc_norm head (``cmae.interop.encoders.build_classifier``; a ``ConvViTClassifier`` carries a
ConvViT encoder, which timm cannot hold). Here: the train view (RandomResizedCrop, flip,
RandAugment), mixup / cutmix, partial fine-tuning
(``trainable_blocks=k``: the last k blocks and the head) and the top-1 / top-5 evaluation. The
AdamW groups with layer-wise lr decay are ``cmae.runtime.optim.layer_decay_groups``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cmae.data.views import normalize
from cmae.eval.frozen import topk_accuracy
from cmae.models.convvit import ConvViTClassifier
from cmae.runtime.progress import optional_progress

BETAS = (0.9, 0.999)
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop, timm / MAE default
MIX_SWITCH_PROB = 0.5  # mixup or cutmix, one per batch


def train_transform(
    img_size: int, rand_augment: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable:
    """RandomResizedCrop + flip + RandAugment (timm) -> uint8 tensor. Normalisation and random
    erasing run batched on the device (``use_prefetcher=True`` leaves them out, as timm's GPU
    prefetcher does). RandAugment's posterize keeps at least 1 bit (``clamp_posterize``)."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=CROP_SCALE,
        hflip=0.5,
        color_jitter=None,  # RandAugment replaces colour jitter (MAE)
        auto_augment=rand_augment or None,
        interpolation="bicubic",
        mean=mean,  # RandAugment's fill colour
        std=std,
        use_prefetcher=True,
    )
    clamp_posterize(transform)
    return transform


POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")
MIN_POSTERIZE_BITS = 1  # Pillow >= 11 rejects 0 bits (ImageOps.posterize: bits in [1, 8])


def clamp_posterize(transform: Callable) -> int:
    """Make every posterize op of the RandAugment(s) in ``transform`` keep at least one bit;
    returns how many ops were changed.

    timm maps the magnitude to the bits kept: ``PosterizeIncreasing`` keeps 4 - int(m / 10 * 4),
    0 bits at m = 10 (reached by ``rand-m9-mstd0.5``: N(9, 0.5) clipped at 10), and
    ``Posterize`` keeps int(m / 10 * 4), 0 bits below m = 2.5. Pillow 13 rejects 0 bits (older
    Pillow made the image black). Clamping to 1 bit keeps the op's meaning, the strongest
    posterize at the top magnitude, and changes nothing where timm already kept >= 1 bit. Only
    the built ops' ``level_fn`` is wrapped: timm itself is untouched.
    """
    changed = 0
    for t in getattr(transform, "transforms", [transform]):
        if not isinstance(t, RandAugment):
            continue
        for op in t.ops:
            if op.name in POSTERIZE_OPS and not isinstance(op.level_fn, _AtLeastOneBit):
                op.level_fn = _AtLeastOneBit(op.level_fn)
                changed += 1
    return changed


class _AtLeastOneBit:
    """A posterize level function whose bit count is clamped to ``MIN_POSTERIZE_BITS``
    (a class, not a closure, so the transform still pickles into spawned data workers)."""

    def __init__(self, level_fn: Callable) -> None:
        self.level_fn = level_fn

    def __call__(self, level: float, hparams: dict) -> tuple[int]:
        (bits,) = self.level_fn(level, hparams)
        return (max(MIN_POSTERIZE_BITS, bits),)


def build_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Mixup | None:
    """timm Mixup (mixup / cutmix switched per batch, labels smoothed), or None when both off."""
    if mixup == 0 and cutmix == 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=1.0,
        switch_prob=MIX_SWITCH_PROB,
        mode="batch",
        label_smoothing=smoothing,
        num_classes=num_classes,
    )


def freeze_for_partial(
    model: VisionTransformer | ConvViTClassifier, trainable_blocks: int | None
) -> None:
    """Partial fine-tuning: only the last ``trainable_blocks`` (transformer) blocks, the final
    norm / fc_norm and the head train (None = everything trains)."""
    if trainable_blocks is None:
        return
    model.requires_grad_(False)
    vit = model.encoder if isinstance(model, ConvViTClassifier) else model
    depth = len(vit.blocks)
    for block in vit.blocks[depth - min(trainable_blocks, depth) :]:
        block.requires_grad_(True)
    for module in (vit.norm, model.fc_norm, model.head):
        module.requires_grad_(True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    progress: str | None = "cmae finetune: evaluation",
) -> tuple[float, float]:
    """(top-1, top-5) in percent on ``loader``; ``progress``: the label of its progress
    (a pass over a few seconds shows one; None: silent)."""
    model.eval()
    logits: list[Tensor] = []
    labels: list[Tensor] = []
    with optional_progress(loader.dataset, progress) as bar:
        for imgs, y in loader:
            logits.append(model(normalize(imgs.to(device, non_blocking=True), mean, std)).cpu())
            labels.append(torch.as_tensor(y))
            bar.update(len(y))
    top1, top5 = topk_accuracy(torch.cat(logits).float(), torch.cat(labels))
    return top1, top5
