"""``cmae finetune``: end-to-end fine-tuning, the MAE / CMAE recipe (spec section 5).

A timm ``VisionTransformer`` carries the pretrained encoder (same key names) with a global-pool
+ fc_norm head (a ``ConvViTClassifier`` carries a ConvViT encoder, which timm cannot hold);
AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix, label
smoothing, warmup + cosine per iteration; evaluated after every epoch.
``trainable_blocks=k`` fine-tunes only the last k blocks and the head (partial fine-tuning).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmae.config import ConfigError, FinetuneConfig, to_dict
from cmae.data.datasets import labelled_splits, loader_workers
from cmae.data.views import eval_transform, normalize
from cmae.eval.frozen import eval_normalization, topk_accuracy, write_results
from cmae.interop.encoders import build_classifier, load_encoder_weights
from cmae.models.convvit import ConvViTClassifier
from cmae.runtime.device import keep_freed_memory, resolve_device, seed_everything
from cmae.runtime.optim import cosine_lr

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


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``: patch embed,
    cls token and pos-embed are layer 0, block i is layer i + 1, norm and head depth + 1. No
    weight decay on 1-D parameters and ``no_weight_decay()``; frozen parameters left out.
    A ConvViT has ``depth + 4`` layers (``ConvViTClassifier.layer_id``: stage 1, stage 2, the
    stage-3 embedding, each transformer block, head), the same rule otherwise; so does any model
    with ``num_layers`` / ``layer_id(name)`` / ``no_weight_decay()`` (``cmae segment``'s UperNet:
    its pyramid and heads are the top layer)."""
    if isinstance(model, ConvViTClassifier) or hasattr(model, "layer_id"):
        return _groups_by_layer(model, weight_decay, layer_decay)
    return param_groups_layer_decay(
        model, weight_decay, model.no_weight_decay(), layer_decay=layer_decay
    )


def _groups_by_layer(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    top = model.num_layers - 1
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = model.layer_id(name), p.ndim > 1 and name not in skip
        group = groups.setdefault(
            (layer, decay),
            {
                "lr_scale": layer_decay ** (top - layer),
                "weight_decay": weight_decay if decay else 0.0,
                "params": [],
            },
        )
        group["params"].append(p)
    return list(groups.values())


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


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    lr_at: Callable[[int], float],
    step: int,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    eraser: RandomErasing | None,
    mixup: Mixup | None,
) -> tuple[int, float]:
    """One epoch; lr set per iteration (times each group's layer-decay scale). Returns the
    step count after it and the mean training loss."""
    model.train()
    total = torch.zeros((), device=device)
    n = 0
    for imgs, y in loader:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x = normalize(imgs.to(device, non_blocking=True), mean, std)
        y = y.to(device, non_blocking=True)
        if eraser is not None:
            x = eraser(x)  # on normalised pixels, before mixing (timm's order)
        if mixup is not None:
            x, y = mixup(x, y)  # y: soft targets [B, C]
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        n += 1
        step += 1
    return step, (total / max(n, 1)).item()  # .item(): one sync per epoch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[float, float]:
    """(top-1, top-5) in percent on ``loader``."""
    model.eval()
    logits: list[Tensor] = []
    labels: list[Tensor] = []
    for imgs, y in loader:
        logits.append(model(normalize(imgs.to(device, non_blocking=True), mean, std)).cpu())
        labels.append(torch.as_tensor(y))
    top1, top5 = topk_accuracy(torch.cat(logits).float(), torch.cat(labels))
    return top1, top5


def run(cfg: FinetuneConfig) -> dict:
    d, out_dir = cfg.data, Path(cfg.out)
    device = resolve_device(cfg.device)
    keep_freed_memory()  # as pretraining: no page faults for each step's activations
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(d.mean, d.std, weights)
    train_set, val_set, classes = labelled_splits(
        d.path,
        train_transform(weights.img_size, cfg.rand_augment, mean, std),
        eval_transform(weights.img_size, d.crop_pct),
        d.synthetic(),
    )
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the train split ({len(train_set)})"
        )
    workers = loader_workers(d.num_workers)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,  # mixup pairs samples: the batch must stay even
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=workers)

    model = build_classifier(weights, len(classes), cfg.encoder.pool, cfg.drop_path).to(device)
    freeze_for_partial(model, cfg.trainable_blocks)
    base_lr = cfg.blr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr, betas=BETAS
    )
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, len(classes))
    criterion = (
        SoftTargetCrossEntropy()
        if mixup is not None
        else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    )
    eraser = RandomErasing(cfg.reprob, mode="pixel", device=str(device)) if cfg.reprob > 0 else None
    total_steps = cfg.epochs * len(loader)
    warmup_steps = cfg.warmup_epochs * len(loader)

    def lr_at(step: int) -> float:
        return cosine_lr(step, total_steps, warmup_steps, base_lr, cfg.min_lr)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"cmae finetune: {weights.encoder} {weights.img_size}px, {n_train / 1e6:.2f}M trainable "
        f"params, {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
        f"{len(loader)} steps/epoch x {cfg.epochs} epochs, lr {base_lr:.3g}, device {device}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    history = []
    step = 0
    with open(out_dir / "log.jsonl", "a") as log:
        for epoch in tqdm(range(cfg.epochs), desc="finetune", dynamic_ncols=True):
            step, loss = train_one_epoch(
                model, loader, optimizer, criterion, lr_at, step, device, mean, std, eraser, mixup
            )
            rec = {"epoch": epoch, "step": step, "loss": loss}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                top1, top5 = evaluate(model, val_loader, device, mean, std)
                rec.update(top1=top1, top5=top5)
                history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    best = max(history, key=lambda r: r["top1"])  # of the evaluated epochs
    results = {
        "top1": history[-1]["top1"],  # last epoch
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "final_loss": history[-1]["loss"],
        "n_train": len(train_set),
        "n_val": len(val_set),
        "num_classes": len(classes),
        "trainable_params": n_train,
        "mean": mean,
        "std": std,
    }
    write_results(out_dir, results, to_dict(cfg))
    print(
        f"cmae finetune: last top-1 {results['top1']:.2f}% (top-5 {results['top5']:.2f}%), best "
        f"top-1 {best['top1']:.2f}% at epoch {best['epoch']}; wrote {out_dir / 'results.json'}"
    )
    return results
