"""The two CMAE losses as pure functions (spec section 4)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def masked_pixel_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MSE between predicted and true patches, averaged over masked patches only.

    pred, target: [N, L, p*p*3]; mask: [N, L] with 1 = removed (predicted), 0 = visible.
    With ``norm_pix`` each target patch is standardised by its own mean and unbiased variance
    (MAE's norm_pix_loss). Computed in fp32 whatever the autocast dtype.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def gather_keys(k: Tensor) -> tuple[Tensor, int]:
    """All keys of the global batch and this rank's offset into them.

    Without an initialised process group (single process, CPU) this is the identity. The
    all_gather carries no gradient, which is what we want: keys come from the momentum branch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * k.shape[0]


def info_nce(
    q: Tensor, k: Tensor, temperature: float, keys: Tensor | None = None, offset: int | None = None
) -> Tensor:
    """One-directional InfoNCE of queries q [N, C] against keys, scaled by 2*tau (MoCo v3).

    The positive of q[i] is k[i]; the negatives are all other keys of the *global* batch
    (``keys``, gathered across ranks when not given). ``offset`` is the index of k[0] in
    ``keys``. Logits and the reduction run in fp32.
    """
    k = k.detach()
    if keys is None:
        keys, offset = gather_keys(k)
    elif offset is None:
        raise ValueError("info_nce: pass offset together with keys")
    q = F.normalize(q.float(), dim=1)
    keys = F.normalize(keys.detach().float(), dim=1)
    logits = q @ keys.t() / temperature  # [N, N_global]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return 2 * temperature * F.cross_entropy(logits, labels)
