"""Optimizer parameter groups and the per-iteration schedules (spec section 5)."""

from __future__ import annotations

import math

from torch import nn

WD_EXEMPT = ("reference", "1d")


def param_groups(model: nn.Module, weight_decay: float, exempt: str = "reference") -> list[dict]:
    """AdamW groups [decayed, not decayed]. Frozen parameters are left out (the target branch,
    the fixed sin-cos embeddings).

    ``exempt="reference"`` (default): as the official CMAE recipe, whose ``custom_keys`` exempt
    names containing ``ln``, ``bias``, ``pos_embed``, ``mask_token``, ``cls_token``: no decay
    on biases, LayerNorm parameters (its ``ln*`` are our ``norm*``; matched by module type)
    and the tokens / position embeddings in ``no_weight_decay()``; the projector / predictor
    BatchNorm weights ARE decayed. ``exempt="1d"``: the MAE rule, no decay on any 1-D
    parameter (BatchNorm weights too).
    """
    if exempt not in WD_EXEMPT:
        raise ValueError(f"exempt must be one of {WD_EXEMPT}, got {exempt!r}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if exempt == "reference":
        for mod_name, mod in model.named_modules():
            if isinstance(mod, nn.LayerNorm):
                skip |= {f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exempt == "1d":
            exempted = p.ndim <= 1 or name in skip
        else:
            exempted = name in skip or name.endswith("bias")
        (no_decay if exempted else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0, then half-cosine from base_lr to min_lr, per iteration."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def momentum_at(step: int, total_steps: int, base: float, end: float) -> float:
    """m(k) = end - (end - base) * (cos(pi k / K) + 1) / 2; constant when end == base."""
    return end - (end - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0
