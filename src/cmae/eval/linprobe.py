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

from cmae.config import ConfigError, LinprobeConfig, to_dict
from cmae.data.datasets import loader_workers
from cmae.data.shards import refuse_streamed
from cmae.data.sources import labelled_splits
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
from cmae.runtime.progress import Progress

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
    bar = Progress(total, "cmae linprobe: training heads", unit="step")
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
    if cfg.mode == "full" and d.path is not None:  # before the held-out features are extracted
        refuse_streamed(d.path, "mode=full", " (or use mode=fast, which streams them)")
    weights, mean, std, view, train_set, val_set, classes, cache_dir, key = frozen_setup(cfg)
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the train split ({len(train_set)})"
        )
    encoder = build_vit_encoder(weights).to(device).requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    selection: list[dict] | None = None
    blrs = cfg.blrs
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
            "cmae linprobe",
        )
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
        if cfg.lr_from == "train":  # choose on a part of train; the held-out split scores once
            fit, held = holdout_split(y_tr.cpu(), cfg.lr_holdout, cfg.seed)
            if len(fit) < cfg.batch_size:
                raise ConfigError(
                    f"batch_size: {cfg.batch_size} is larger than the part of train the lr is "
                    f"chosen on ({len(fit)} images; lr_holdout={cfg.lr_holdout})"
                )
            batches = feature_batches(x_tr[fit], y_tr[fit], cfg.batch_size, generator)
            n_steps, n_classes = len(fit) // cfg.batch_size, len(classes)
            selection = probe_heads(
                cfg, blrs, batches, n_steps, x_tr[held], y_tr[held], n_classes, device
            )
            blrs = (max(selection, key=lambda h: h["top1"])["blr"],)
            generator = torch.Generator().manual_seed(cfg.seed)
        batches = feature_batches(x_tr, y_tr, cfg.batch_size, generator)
        steps_per_epoch = len(x_tr) // cfg.batch_size
    else:
        val_file = feature_cache_file(cache_dir, key, "val")
        x_va, y_va = cached_features(
            encoder,
            val_set,
            device,
            mean,
            std,
            pool,
            EXTRACT_BATCH,
            workers,
            val_file,
            "cmae linprobe: val features",
        )
        augment = crop_flip(weights.img_size, PROBE_CROP_SCALE, PROBE_CROP_RATIO, 0.5)
        aug_set, _, _ = labelled_splits(d.path, augment, view, d.synthetic(), "mode=full")
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

    per_head = probe_heads(cfg, blrs, batches, steps_per_epoch, x_va, y_va, len(classes), device)
    best = max(per_head, key=lambda h: h["top1"])
    results = {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_blr": best["blr"],
        "heads": per_head,
        "lr_from": cfg.lr_from,
        "n_train": len(train_set),
        "n_val": len(y_va),
        "num_classes": len(classes),
        "mean": mean,
        "std": std,
    }
    if selection is not None:
        results["selection"] = {"heads": selection, "n_holdout": len(held), "n_fit": len(fit)}
        how = (
            f"chosen of {len(cfg.blrs)} on {len(held)} held-out train images, then trained on "
            f"all {len(train_set)} and scored once on {len(y_va)} val images"
        )
    else:
        how = (
            f"best of {len(blrs)} on the held-out split, {len(train_set)} train / "
            f"{len(y_va)} val images"
        )
    write_results(out_dir, results, to_dict(cfg))
    print(
        f"cmae linprobe ({cfg.mode}, {cfg.optimizer}): top-1 {best['top1']:.2f}%  "
        f"top-5 {best['top5']:.2f}% at blr {best['blr']:g} ({how}, {cfg.encoder.checkpoint}); "
        f"wrote {out_dir / 'results.json'}"
    )
    return results


def probe_heads(
    cfg: LinprobeConfig,
    blrs: Sequence[float],
    batches: Batches,
    steps_per_epoch: int,
    x_eval: Tensor,
    y_eval: Tensor,
    num_classes: int,
    device: torch.device,
) -> list[dict]:
    """One head per blr trained on ``batches``, each scored on (x_eval, y_eval)."""
    lrs = [blr * cfg.batch_size / 256 for blr in blrs]
    seed_everything(cfg.seed)
    heads = ProbeHeads(x_eval.shape[1], num_classes, len(lrs)).to(device)
    losses = train_heads(
        heads, batches, steps_per_epoch, lrs, cfg.epochs, cfg.warmup_epochs, cfg.optimizer
    )
    accs = evaluate_heads(heads, x_eval.to(device), y_eval.to(device))
    return [
        {"blr": blr, "lr": lr, "top1": a1, "top5": a5, "train_loss": loss}
        for blr, lr, (a1, a5), loss in zip(blrs, lrs, accs, losses, strict=True)
    ]


def holdout_split(y: Tensor, frac: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (fit, held) into labels ``y``: per class a seeded random ``frac`` of its
    samples (at least one, when it has two or more) is held out."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = max(1, round(len(idx) * frac)) if len(idx) > 1 else 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values
