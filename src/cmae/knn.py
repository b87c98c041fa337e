"""Weighted k-nearest-neighbour evaluation of frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cmae.views import normalize


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
) -> tuple[Tensor, Tensor]:
    """L2-normalised features [N, D] (cls token or mean of patch tokens) and labels [N]."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for imgs, y in loader:
        x = encoder(normalize(imgs.to(device, non_blocking=True), mean, std))  # [N, 1+L, D]
        f = x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 0]
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [Nq, C]: each of the k most cosine-similar bank items votes exp(sim / T)
    for its label. Queries are processed in chunks so Nq x Nbank never sits in memory at once."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.t()  # [c, Nbank]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks]


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
