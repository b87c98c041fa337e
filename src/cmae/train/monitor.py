"""Health numbers of a pretraining run, logged next to the losses.

A collapsing contrastive branch shows up here before the kNN accuracy drops: the keys lose
their spread across the batch (``key_std`` -> 0) and positives become indistinguishable from
negatives (``pos_cos - neg_cos`` -> 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def contrastive_health(q: Tensor, k: Tensor) -> dict[str, float]:
    """Of queries q [N, D] and keys k [N, D] (the local batch), after L2 normalisation:

    - ``pos_cos``: mean cosine of each query with its own key (-> 1 as the task is learned),
    - ``neg_cos``: mean cosine of each query with the other samples' keys,
    - ``key_std``: per-dimension std of the normalised keys across the batch, averaged over
      dimensions and scaled by sqrt(D): about 1 for well-spread keys, 0 when all keys collapse
      to one vector (SimSiam's collapse check).
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    n, dim = q.shape
    sim = q @ k.t()  # [N, N]
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)
    key_std = k.std(dim=0).mean() * math.sqrt(dim) if n > 1 else k.new_zeros(())
    # one host sync for the three numbers: this runs at logging steps only
    pos, neg, key_std = torch.stack([pos, neg, key_std]).tolist()
    return {"pos_cos": pos, "neg_cos": neg, "key_std": key_std}
