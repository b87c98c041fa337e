"""Frozen-encoder features, shared by the evaluation commands: extraction (cls token or
mean-pooled patch tokens), an on-disk feature cache keyed by the exact weights and data, the
setup kNN and the linear probe share, top-k accuracy and the results files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cmae.config import IMAGENET_MEAN, IMAGENET_STD
from cmae.data.datasets import is_shards
from cmae.data.shards import shard_splits
from cmae.data.sources import labelled_splits
from cmae.data.views import eval_transform, normalize
from cmae.interop.encoders import EncoderWeights, load_encoder_weights
from cmae.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_text
from cmae.runtime.faults import worker_options
from cmae.runtime.progress import optional_progress


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
    worker_init_fn: Callable[[int], None] | None = None,
    progress: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Features [N, D] (cls token or mean of patch tokens; L2-normalised unless told not to)
    and labels [N], on the CPU. ``worker_init_fn``: inside a training run, its
    ``StopSignals.worker_init_fn`` (the loader's workers then outlive a stop signal sent to
    the whole process group while the main process finishes and saves). ``progress``: the
    label of a progress bar / log lines with an ETA (None: silent, as the training monitor)."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        **worker_options(num_workers, worker_init_fn),
    )
    feats, labels = [], []
    with optional_progress(dataset, progress) as bar:
        for imgs, y in loader:
            x = encoder(normalize(imgs.to(device, non_blocking=True), mean, std))  # [N, 1+L, D]
            f = pool_tokens(x, pool).float()
            feats.append((F.normalize(f, dim=1) if l2_normalize else f).cpu())
            labels.append(torch.as_tensor(y))
            bar.update(len(f))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def pool_tokens(x: Tensor, pool: str) -> Tensor:
    """[N, 1+L, D] encoder tokens -> [N, D]: mean of the patch tokens or the cls token."""
    return x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 0]


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [100.0 * hits[:, :k].any(dim=1).sum().item() / len(labels) for k in ks]


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
    progress: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Raw (un-normalised) pooled features [N, D] and labels [N]: read from ``cache_file`` when
    it exists, else extracted and written there (``None``: no cache); ``progress`` as in
    ``extract_features``."""
    if cache_file is not None and cache_file.is_file():
        try:
            entry = load_checkpoint(cache_file)
            if entry["features"].shape[0] == len(dataset):
                return entry["features"], entry["labels"]
        except (CheckpointError, KeyError, TypeError):
            pass  # unreadable or foreign file: extract again and overwrite it
    feats, labels = extract_features(
        encoder,
        dataset,
        device,
        mean,
        std,
        pool,
        batch_size,
        num_workers,
        l2_normalize=False,
        progress=progress,
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
    command: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train features, train labels, val features, val labels), raw, through the cache;
    ``command`` (e.g. "cmae knn") labels the progress of each extraction."""
    out = []
    for split, dataset in (("train", train_set), ("val", val_set)):
        cache_file = feature_cache_file(cache_dir, key, split)
        label = f"{command}: {split} features" if command else None
        out += cached_features(
            encoder, dataset, device, mean, std, pool, batch_size, num_workers, cache_file, label
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
    """OUT/results.json (metrics + resolved config) and OUT/config.yaml (reusable --config),
    each written atomically (whole or not at all)."""
    save_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    save_text(out_dir / "results.json", json.dumps({**results, "config": config}, indent=2))


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
    if is_shards(d.path):
        train_set, val_set, classes = shard_splits(d.path, view)
    else:
        train_set, val_set, classes = labelled_splits(d.path, view, view, d.synthetic())
    cache_dir = Path(cfg.cache_dir or Path(cfg.out) / "features") if cfg.cache else None
    key = features_key(weights, d.path, d.synthetic(), d.crop_pct, mean, std, cfg.encoder.pool)
    return FrozenSetup(weights, mean, std, view, train_set, val_set, classes, cache_dir, key)
