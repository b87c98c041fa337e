"""``cmae knn``: weighted k-nearest-neighbour evaluation of frozen features (InstDisc / DINO).

Also the frozen-feature pieces the linear probe reuses: extraction (cls token or mean-pooled
patch tokens) and an on-disk feature cache keyed by the exact weights and data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cmae.config import IMAGENET_MEAN, IMAGENET_STD, KnnConfig, to_dict
from cmae.data.datasets import labelled_splits, loader_workers
from cmae.data.views import eval_transform, normalize
from cmae.interop.encoders import EncoderWeights, build_vit_encoder, load_encoder_weights
from cmae.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cmae.runtime.device import resolve_device

# queries per similarity block: 1024 x 50k float32 = 200 MB, so a 50k bank x 10k queries fits
KNN_CHUNK = 1024


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str = "mean",
    batch_size: int = 256,
    num_workers: int = 0,
    l2_normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Features [N, D] (cls token or mean of patch tokens; L2-normalised unless told not to)
    and labels [N], on the CPU."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for imgs, y in loader:
        x = encoder(normalize(imgs.to(device, non_blocking=True), mean, std))  # [N, 1+L, D]
        f = pool_tokens(x, pool).float()
        feats.append((F.normalize(f, dim=1) if l2_normalize else f).cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def pool_tokens(x: Tensor, pool: str) -> Tensor:
    """[N, 1+L, D] encoder tokens -> [N, D]: mean of the patch tokens or the cls token."""
    return x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 0]


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = KNN_CHUNK,
) -> Tensor:
    """Class scores [Nq, C]: each of the k most cosine-similar bank items votes exp(sim / T)
    for its label. Queries are processed in chunks so Nq x Nbank never sits in memory at once."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.t()  # [c, Nbank]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [100.0 * hits[:, :k].any(dim=1).sum().item() / len(labels) for k in ks]


def knn_eval(
    encoder: nn.Module,
    bank_set: Dataset,
    query_set: Dataset,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "mean",
    num_workers: int = 0,
) -> dict:
    """Extract features of both sets and return {"top1", "top5"} (percent)."""
    bank, bank_y = extract_features(
        encoder, bank_set, device, mean, std, pool, num_workers=num_workers
    )
    q, q_y = extract_features(encoder, query_set, device, mean, std, pool, num_workers=num_workers)
    num_classes = int(max(bank_y.max(), q_y.max())) + 1
    scores = knn_predict(bank, bank_y, q, num_classes, k, temperature)
    top1, top5 = topk_accuracy(scores, q_y)
    return {
        "top1": top1,
        "top5": top5,
        "k": k,
        "temperature": temperature,
        "pool": pool,
        "n_bank": len(bank_y),
        "n_query": len(q_y),
    }


# ---------------------------------------------------------------------------------------------
# frozen features with an on-disk cache (knn and the fast linear probe)


def cached_features(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str,
    batch_size: int,
    num_workers: int,
    cache_file: Path | None,
) -> tuple[Tensor, Tensor]:
    """Raw (un-normalised) pooled features [N, D] and labels [N]: read from ``cache_file`` when
    it exists, else extracted and written there (``None``: no cache)."""
    if cache_file is not None and cache_file.is_file():
        try:
            entry = load_checkpoint(cache_file)
            if entry["features"].shape[0] == len(dataset):
                return entry["features"], entry["labels"]
        except (CheckpointError, KeyError, TypeError):
            pass  # unreadable or foreign file: extract again and overwrite it
    feats, labels = extract_features(
        encoder, dataset, device, mean, std, pool, batch_size, num_workers, l2_normalize=False
    )
    if cache_file is not None:
        save_checkpoint({"features": feats, "labels": labels}, cache_file)
    return feats, labels


def frozen_features(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str,
    batch_size: int,
    num_workers: int,
    cache_dir: Path | None,
    key: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train features, train labels, val features, val labels), raw, through the cache."""
    out = []
    for split, dataset in (("train", train_set), ("val", val_set)):
        cache_file = feature_cache_file(cache_dir, key, split)
        out += cached_features(
            encoder, dataset, device, mean, std, pool, batch_size, num_workers, cache_file
        )
    return tuple(out)


def feature_cache_file(cache_dir: Path | None, key: str, split: str) -> Path | None:
    """``cache_dir/<hash of key>-<split>.pt``, or None when caching is off."""
    if cache_dir is None:
        return None
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-{split}.pt"


def features_key(
    weights: EncoderWeights,
    data_path: str | None,
    synthetic: dict[str, int],
    crop_pct: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str,
) -> str:
    """Everything the frozen features depend on: the exact weights, the data and the view."""
    data = str(Path(data_path).expanduser().resolve()) if data_path else synthetic
    return json.dumps([weights.source_id, data, weights.img_size, crop_pct, mean, std, pool])


def eval_normalization(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, weights: EncoderWeights
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The given mean/std if set, else the pretraining run's (checkpoint.pt), else ImageNet's."""
    return tuple(mean or weights.mean or IMAGENET_MEAN), tuple(std or weights.std or IMAGENET_STD)


def write_results(out_dir: Path, results: dict, config: dict) -> None:
    """OUT/results.json (metrics + resolved config) and OUT/config.yaml (reusable --config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out_dir / "results.json").write_text(json.dumps({**results, "config": config}, indent=2))


# ---------------------------------------------------------------------------------------------


class FrozenSetup(NamedTuple):
    weights: EncoderWeights
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view: nn.Module  # the un-augmented eval transform
    train_set: Dataset
    val_set: Dataset
    classes: list[str]
    cache_dir: Path | None
    key: str


def frozen_setup(cfg) -> FrozenSetup:  # cfg: KnnConfig or LinprobeConfig
    """What kNN and the linear probe share: weights, normalisation, splits, feature-cache key."""
    d = cfg.data
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(d.mean, d.std, weights)
    view = eval_transform(weights.img_size, d.crop_pct)
    train_set, val_set, classes = labelled_splits(d.path, view, view, d.synthetic())
    cache_dir = Path(cfg.cache_dir or Path(cfg.out) / "features") if cfg.cache else None
    key = features_key(weights, d.path, d.synthetic(), d.crop_pct, mean, std, cfg.encoder.pool)
    return FrozenSetup(weights, mean, std, view, train_set, val_set, classes, cache_dir, key)


def run(cfg: KnnConfig) -> dict:

    d, pool, out_dir = cfg.data, cfg.encoder.pool, Path(cfg.out)
    device = resolve_device(cfg.device)
    weights, mean, std, _, train_set, val_set, classes, cache_dir, key = frozen_setup(cfg)
    encoder = build_vit_encoder(weights).to(device)
    bank, bank_y, q, q_y = frozen_features(
        encoder,
        train_set,
        val_set,
        device,
        mean,
        std,
        pool,
        cfg.batch_size,
        loader_workers(d.num_workers),
        cache_dir,
        key,
    )
    bank, q = F.normalize(bank, dim=1).to(device), F.normalize(q, dim=1).to(device)
    scores = knn_predict(bank, bank_y.to(device), q, len(classes), cfg.k, cfg.temperature)
    top1, top5 = topk_accuracy(scores.cpu(), q_y)
    results = {
        "top1": top1,
        "top5": top5,
        "n_train": len(bank_y),
        "n_val": len(q_y),
        "num_classes": len(classes),
        "mean": mean,
        "std": std,
    }
    write_results(out_dir, results, to_dict(cfg))
    print(
        f"cmae knn: top-1 {top1:.2f}%  top-5 {top5:.2f}%  (k={cfg.k}, T={cfg.temperature}, "
        f"{pool} pool, {len(bank_y)} train / {len(q_y)} val images, "
        f"{cfg.encoder.checkpoint}); wrote {out_dir / 'results.json'}"
    )
    return results
