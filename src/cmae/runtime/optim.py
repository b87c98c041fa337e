"""Optimizer parameter groups and the per-iteration schedules (spec section 5)."""

from __future__ import annotations

import math

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norm weights (any 1-D parameter) and the tokens /
    position embeddings the model lists in ``no_weight_decay()``. Frozen parameters are left
    out (the target branch, the fixed sin-cos embeddings)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
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
