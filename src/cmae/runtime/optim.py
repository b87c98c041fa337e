"""Optimizer parameter groups and the per-iteration schedules of every training command: the
pretraining groups and cosine schedule (spec section 5), the layer-wise lr decay groups of
fine-tuning and segmentation, segmentation's warmup + poly schedule, the EMA momentum."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

WD_EXEMPT = ("reference", "1d")
WARMUP_START = 1e-6  # poly_lr's first warmup factor (mmengine LinearLR start_factor)


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


def poly_lr(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, power: float, min_lr: float
) -> float:
    """Linear warmup from base_lr x 1e-6 over ``warmup_steps``, then poly(``power``) decay to
    ``min_lr`` at ``total_steps`` (mmsegmentation's LinearLR + PolyLR, per iteration)."""
    if step < warmup_steps:
        return base_lr * (WARMUP_START + (1 - WARMUP_START) * step / warmup_steps)
    frac = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return (base_lr - min_lr) * (1 - frac) ** power + min_lr


def multistep_lr(
    step: int, lr: float, warmup: int, factor: float, steps: tuple[int, ...], gamma: float
) -> float:
    """Linear warmup from lr x ``factor`` over ``warmup`` iterations, times ``gamma`` for each
    of ``steps`` passed (detectron2's WarmupParamScheduler over a MultiStepParamScheduler)."""
    scale = gamma ** sum(step >= s for s in steps)
    if step < warmup:
        scale *= factor + (1 - factor) * step / warmup
    return lr * scale


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``: patch embed,
    cls token and pos-embed are layer 0, block i is layer i + 1, norm and head depth + 1. No
    weight decay on 1-D parameters and ``no_weight_decay()``; frozen parameters left out.
    A model with ``num_layers`` / ``layer_id(name)`` / ``no_weight_decay()`` gives its own
    layers: a ConvViT classifier (``depth + 4``: stage 1, stage 2, the stage-3 embedding, each
    transformer block, head), ``cmae segment``'s UperNet (its pyramid and heads on top); a timm
    ``VisionTransformer`` is grouped by timm."""
    if hasattr(model, "layer_id"):
        return _groups_by_layer(model, weight_decay, layer_decay)
    return param_groups_layer_decay(
        model, weight_decay, model.no_weight_decay(), layer_decay=layer_decay
    )


def _groups_by_layer(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    top = model.num_layers - 1
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = model.layer_id(name), p.ndim > 1 and name not in skip
        group = groups.setdefault(
            (layer, decay),
            {
                "lr_scale": layer_decay ** (top - layer),
                "weight_decay": weight_decay if decay else 0.0,
                "params": [],
            },
        )
        group["params"].append(p)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times its ``lr_scale`` (layer decay; 1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
