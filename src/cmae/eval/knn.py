"""``cmae knn``: weighted k-nearest-neighbour evaluation of frozen features (InstDisc / DINO)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from cmae.config import KnnConfig, to_dict
from cmae.data.datasets import loader_workers
from cmae.eval.frozen import (
    extract_features,
    frozen_features,
    frozen_setup,
    topk_accuracy,
    write_results,
)
from cmae.interop.encoders import build_vit_encoder
from cmae.runtime.device import resolve_device

# queries per similarity block: 1024 x 50k float32 = 200 MB, so a 50k bank x 10k queries fits
KNN_CHUNK = 1024


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
    worker_init_fn: Callable[[int], None] | None = None,
) -> dict:
    """Extract features of both sets and return {"top1", "top5"} (percent);
    ``worker_init_fn`` as in ``extract_features``."""
    loading = {"num_workers": num_workers, "worker_init_fn": worker_init_fn}
    bank, bank_y = extract_features(encoder, bank_set, device, mean, std, pool, **loading)
    q, q_y = extract_features(encoder, query_set, device, mean, std, pool, **loading)
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
        "cmae knn",
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
