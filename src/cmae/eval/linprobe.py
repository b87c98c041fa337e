"""``cmae linprobe``: linear probing of a frozen encoder.

MAE protocol: BatchNorm1d without affine + Linear on frozen features, LARS (or SGD with
momentum), linear warmup + cosine per iteration, RandomResizedCrop + flip (``mode=full``).
``mode=fast`` trains on cached features of the un-augmented images. Both train one head per
learning rate in the same pass over the data (dinov2) and report the best head on the held-out
split, with every head's result alongside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmae.config import ConfigError, LinprobeConfig, to_dict
from cmae.data.datasets import labelled_splits, loader_workers
from cmae.data.views import crop_flip, normalize
from cmae.eval.frozen import (
    cached_features,
    feature_cache_file,
    frozen_features,
    frozen_setup,
    pool_tokens,
    topk_accuracy,
    write_results,
)
from cmae.interop.encoders import build_vit_encoder
from cmae.runtime.device import resolve_device, seed_everything
from cmae.runtime.optim import cosine_lr

# MAE linear-probe augmentation (torchvision RandomResizedCrop defaults) and optimizer momentum
PROBE_CROP_SCALE = (0.08, 1.0)
PROBE_CROP_RATIO = (3 / 4, 4 / 3)
MOMENTUM = 0.9
EXTRACT_BATCH = 256  # images per forward pass when caching features (not the probe's batch)

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # one epoch of (features, labels)


def lars(groups: list[dict]) -> Lars:
    """LARS (You et al., 2017) as MAE's linear probe runs it, from timm: matrices take the
    trust-ratio step trust * ||w|| / ||g|| before momentum, vectors (biases) plain momentum SGD.
    ``always_adapt``: timm adapts only where weight decay is on, and the probe has none; eps 0:
    MAE's ratio has no epsilon (a zero norm keeps the raw step in both)."""
    split = []
    for group in groups:
        matrices = [p for p in group["params"] if p.ndim > 1]
        vectors = [p for p in group["params"] if p.ndim <= 1]
        split += [{**group, "params": matrices, "always_adapt": True}, {**group, "params": vectors}]
    return Lars(split, momentum=MOMENTUM, trust_coeff=0.001, eps=0.0)


class ProbeHeads(nn.Module):
    """BatchNorm1d without affine (MAE: standardises the frozen features), then one Linear per
    learning rate. The norm has no parameters, so sharing it keeps the heads independent."""

    def __init__(self, dim: int, num_classes: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        for head in self.heads:
            trunc_normal_(head.weight, std=0.01)  # MAE's probe init
            nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[N, D] -> logits [H, N, C]."""
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads])


def train_heads(
    heads: ProbeHeads,
    batches: Batches,
    steps_per_epoch: int,
    lrs: Sequence[float],
    epochs: int,
    warmup_epochs: int,
    optimizer: str = "sgd",
) -> list[float]:
    """Train every head with its own lr (warmup + cosine per iteration, no weight decay).
    Returns each head's mean training loss over the last epoch."""
    groups = [
        {"params": list(head.parameters()), "base_lr": lr}
        for head, lr in zip(heads.heads, lrs, strict=True)
    ]
    if optimizer == "lars":
        opt = lars(groups)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lrs[0], momentum=MOMENTUM)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    n_heads = len(heads.heads)
    heads.train()
    step = 0
    bar = tqdm(total=total, desc="linprobe", dynamic_ncols=True)
    for _ in range(epochs):
        epoch_loss, n = torch.zeros(n_heads, device=heads.norm.running_mean.device), 0
        for x, y in batches():
            scale = cosine_lr(step, total, warmup, 1.0)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
            logits = heads(x)  # [H, B, C]
            per_head = F.cross_entropy(
                logits.flatten(0, 1), y.repeat(n_heads), reduction="none"
            ).view(n_heads, -1)
            # the sum of the heads' mean losses: each head gets exactly its own gradient
            loss = per_head.mean(dim=1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            epoch_loss, n = epoch_loss + loss.detach(), n + 1
            step += 1
            bar.update(1)
    bar.close()
    return (epoch_loss / max(n, 1)).tolist()


@torch.no_grad()
def evaluate_heads(
    heads: ProbeHeads, x: Tensor, y: Tensor, chunk: int = 4096
) -> list[tuple[float, float]]:
    """(top-1, top-5) in percent of every head on features x [N, D], labels y [N]."""
    heads.eval()
    logits = torch.cat([heads(x[i : i + chunk]) for i in range(0, len(x), chunk)], dim=1)
    return [tuple(topk_accuracy(head_logits.cpu(), y.cpu())) for head_logits in logits]


def feature_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Batches:
    """Shuffled full batches of cached features (the last partial batch is dropped: BatchNorm
    statistics need a real batch)."""

    def epoch() -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            yield x[idx], y[idx]

    return epoch


def image_batches(
    encoder: nn.Module,
    loader: DataLoader,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str,
) -> Batches:
    """Pooled features of augmented images through the frozen encoder (eval mode, no grad)."""
    encoder.eval()

    def epoch() -> Iterator[tuple[Tensor, Tensor]]:
        for imgs, y in loader:
            with torch.no_grad():
                x = encoder(normalize(imgs.to(device, non_blocking=True), mean, std))
            yield pool_tokens(x, pool).float(), y.to(device)

    return epoch


def run(cfg: LinprobeConfig) -> dict:
    d, pool, out_dir = cfg.data, cfg.encoder.pool, Path(cfg.out)
    workers = loader_workers(d.num_workers)
    device = resolve_device(cfg.device)
    weights, mean, std, view, train_set, val_set, classes, cache_dir, key = frozen_setup(cfg)
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the train split ({len(train_set)})"
        )
    encoder = build_vit_encoder(weights).to(device).requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.mode == "fast":
        x_tr, y_tr, x_va, y_va = frozen_features(
            encoder,
            train_set,
            val_set,
            device,
            mean,
            std,
            pool,
            EXTRACT_BATCH,
            workers,
            cache_dir,
            key,
        )
        batches = feature_batches(x_tr.to(device), y_tr.to(device), cfg.batch_size, generator)
        steps_per_epoch = len(x_tr) // cfg.batch_size
    else:
        val_file = feature_cache_file(cache_dir, key, "val")
        x_va, y_va = cached_features(
            encoder, val_set, device, mean, std, pool, EXTRACT_BATCH, workers, val_file
        )
        augment = crop_flip(weights.img_size, PROBE_CROP_SCALE, PROBE_CROP_RATIO, 0.5)
        aug_set, _, _ = labelled_splits(d.path, augment, view, d.synthetic())
        loader = DataLoader(
            aug_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=generator,
        )
        batches = image_batches(encoder, loader, device, mean, std, pool)
        steps_per_epoch = len(loader)

    lrs = [blr * cfg.batch_size / 256 for blr in cfg.blrs]
    seed_everything(cfg.seed)
    heads = ProbeHeads(x_va.shape[1], len(classes), len(lrs)).to(device)
    losses = train_heads(
        heads, batches, steps_per_epoch, lrs, cfg.epochs, cfg.warmup_epochs, cfg.optimizer
    )
    accs = evaluate_heads(heads, x_va.to(device), y_va.to(device))
    per_head = [
        {"blr": blr, "lr": lr, "top1": a1, "top5": a5, "train_loss": loss}
        for blr, lr, (a1, a5), loss in zip(cfg.blrs, lrs, accs, losses, strict=True)
    ]
    best = max(per_head, key=lambda h: h["top1"])
    results = {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_blr": best["blr"],
        "heads": per_head,
        "n_train": len(train_set),
        "n_val": len(y_va),
        "num_classes": len(classes),
        "mean": mean,
        "std": std,
    }
    write_results(out_dir, results, to_dict(cfg))
    print(
        f"cmae linprobe ({cfg.mode}, {cfg.optimizer}): top-1 {best['top1']:.2f}%  "
        f"top-5 {best['top5']:.2f}% at blr {best['blr']:g} (best of {len(lrs)} on the held-out "
        f"split, {len(train_set)} train / {len(y_va)} val images, {cfg.encoder.checkpoint}); "
        f"wrote {out_dir / 'results.json'}"
    )
    return results
