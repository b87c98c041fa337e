"""Pretrained encoders for evaluation: load a checkpoint, build our ViTEncoder or a timm ViT.

Three sources: a ``cmae pretrain`` checkpoint (``checkpoint.pt``: the ``encoder.`` keys of the
model plus the config that built it), an exported ``encoder.safetensors`` (timm key names), or
``"random"`` (a fresh encoder of a pretraining preset, the baseline). ViT weights always use
timm ``VisionTransformer`` names, so both builders load them with ``strict`` key checks. A
hybrid ConvViT (cmae.models.convvit), which timm has no model for, keeps its own names; it is
built as our ``ConvViT`` and fine-tuned as a ``ConvViTClassifier``.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cmae.config import ConfigError, ModelConfig, compose, load_config, to_dict
from cmae.models.cmae import build_encoder, make_encoder
from cmae.models.convvit import ConvViT, ConvViTClassifier
from cmae.models.sizes import CONVVIT_SIZES, ENCODER_SIZES, vit_size
from cmae.models.upernet import (
    ConvViTPyramid,
    UperNet,
    ViTPyramid,
    build_segmentor,
    resample_pos_embed,
)
from cmae.models.vit import ViTEncoder, sincos_pos_embed
from cmae.runtime.checkpoint import CheckpointError, check_weights, load_checkpoint


class EncoderWeights(NamedTuple):
    state: dict[str, Tensor]  # timm VisionTransformer key names (ConvViT: its own names)
    encoder: str  # a key of ENCODER_SIZES or CONVVIT_SIZES
    img_size: int
    patch_size: int
    # normalisation used in pretraining, when the checkpoint records it
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    source_id: str  # identifies these exact weights (feature cache key)


def load_encoder_weights(checkpoint: str, preset: str = "quick", seed: int = 0) -> EncoderWeights:
    """Encoder weights from ``checkpoint`` (a .pt / .safetensors path or ``"random"``)."""
    if checkpoint == "random":
        model_cfg = load_config(preset).model
        torch.manual_seed(seed)
        state = build_encoder(model_cfg).state_dict()
        source = f"random:{to_dict(model_cfg)}:seed={seed}"
        return EncoderWeights(
            state, model_cfg.encoder, model_cfg.img_size, model_cfg.patch_size, None, None, source
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (or pass 'random')")
    st = os.stat(path)
    # path + size + mtime: a rewritten checkpoint never reuses stale cached features
    source = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if path.suffix == ".safetensors":
        return _from_safetensors(path, source)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a cmae pretraining checkpoint (needs model, config)")
    try:
        model_cfg = compose(ModelConfig, [("", ckpt["config"]["model"])], prefix="model.")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not describe a model: {e}") from e
    try:
        known = model_cfg.encoder in CONVVIT_SIZES or vit_size(model_cfg.encoder) is not None
    except ValueError as e:  # a vit_{W}x{D}h{H} name that cannot be built
        raise CheckpointError(f"{path}: its config's model.encoder: {e}") from e
    if not known:
        names = ", ".join([*ENCODER_SIZES, *CONVVIT_SIZES, "vit_{W}x{D}h{H}"])
        raise CheckpointError(
            f"{path}: its config names an unknown encoder {model_cfg.encoder!r} (known: {names})"
        )
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    data = ckpt["config"].get("data", {})
    mean, std = data.get("mean"), data.get("std")
    return _checked(
        path,
        EncoderWeights(
            state,
            model_cfg.encoder,
            model_cfg.img_size,
            model_cfg.patch_size,
            tuple(mean) if mean is not None else None,
            tuple(std) if std is not None else None,
            source,
        ),
    )


def _checked(path: Path, weights: EncoderWeights) -> EncoderWeights:
    """``weights`` if every tensor is there with the shape its encoder needs, else a one-line
    CheckpointError naming the file, key and shapes."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = make_encoder(weights.encoder, weights.img_size, weights.patch_size)
    what = f"a {weights.encoder} encoder ({weights.img_size} px, patch {weights.patch_size})"
    check_weights(path, weights.state, expected.state_dict(), what)
    return weights


def _from_safetensors(path: Path, source: str) -> EncoderWeights:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    # `cmae export` metadata: mean/std as JSON lists; a whole-model export (--format full) has
    # every tensor under its module prefix and the config as JSON
    mean, std, name = _json_meta(meta, "mean", path), _json_meta(meta, "std", path), None
    sizes = meta  # ConvViT: image size and total stride (the shapes do not fix the image size)
    if "encoder.cls_token" in state:
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        config = _json_meta(meta, "config", path) or {}
        mean, std = config.get("data", {}).get("mean"), config.get("data", {}).get("std")
        name = config.get("model", {}).get("encoder")
        sizes = config.get("model", {})
    if (name or meta.get("encoder")) in CONVVIT_SIZES:
        try:
            img_size, patch = int(sizes["img_size"]), int(sizes["patch_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: ConvViT weights without img_size / patch_size") from e
        return _checked(
            path,
            EncoderWeights(
                state,
                name or meta["encoder"],
                img_size,
                patch,
                tuple(mean) if mean else None,
                tuple(std) if std else None,
                source,
            ),
        )
    missing = [k for k in ("cls_token", "patch_embed.proj.weight", "pos_embed") if k not in state]
    if len(missing) == 3:
        raise CheckpointError(f"{path}: not a ViT encoder with timm key names")
    if missing:
        raise CheckpointError(f"{path}: {missing[0]} is missing (a ViT encoder needs it)")
    # the shapes fix width, depth, patch and grid; the metadata names the size (for the heads)
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    patch = state["patch_embed.proj.weight"].shape[-1]
    pos = state["pos_embed"].shape
    grid = math.isqrt(pos[1] - 1) if len(pos) == 3 and pos[1] > 1 else 0
    if grid * grid + 1 != (pos[1] if len(pos) == 3 else -1):
        raise CheckpointError(
            f"{path}: pos_embed has shape [{', '.join(map(str, pos))}], not [1, 1 + g*g, "
            f"{dim}] of a square g x g patch grid"
        )
    name = name or meta.get("encoder")
    if name is None:
        name = next((n for n, (d, L, _) in ENCODER_SIZES.items() if (d, L) == (dim, depth)), None)
    try:
        size = vit_size(name) if name is not None else None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if size is None or size[:2] != (dim, depth):
        raise CheckpointError(f"{path}: width {dim}, depth {depth} match no known encoder size")
    return _checked(
        path,
        EncoderWeights(
            state,
            name,
            grid * patch,
            patch,
            tuple(mean) if mean else None,
            tuple(std) if std else None,
            source,
        ),
    )


def _json_meta(meta: dict[str, str], key: str, path: Path):
    try:
        return json.loads(meta[key]) if meta.get(key) else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON: {e}") from e


def at_img_size(weights: EncoderWeights, img_size: int | None) -> EncoderWeights:
    """``weights`` for ``img_size`` x ``img_size`` input (None: unchanged): a ViT's position
    embedding resampled bicubically by timm's ``resample_abs_pos_embed`` (cls position kept),
    which is what ``timm.create_model(..., img_size=N, pretrained=True)`` does on loading; a
    ConvViT's fixed sin-cos one recomputed for the new grid."""
    if img_size is None or img_size == weights.img_size:
        return weights
    if img_size <= 0 or img_size % weights.patch_size:
        raise ConfigError(
            f"img_size: {img_size} must be a positive multiple of the patch size "
            f"{weights.patch_size}"
        )
    grid = img_size // weights.patch_size
    pos = weights.state["pos_embed"]  # [1, 1 + g*g, D]
    if weights.encoder in CONVVIT_SIZES:
        new = sincos_pos_embed(pos.shape[-1], grid)[None].to(pos.dtype)
    else:
        old = math.isqrt(pos.shape[1] - 1)
        new = resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[old, old])
    return weights._replace(
        state={**weights.state, "pos_embed": new.contiguous()},
        img_size=img_size,
        source_id=f"{weights.source_id}:img_size={img_size}",
    )


def build_vit_encoder(weights: EncoderWeights) -> ViTEncoder | ConvViT:
    """Our ViTEncoder (returns all tokens after the final norm) with ``weights`` loaded; our
    ConvViT (same interface) for ConvViT weights."""
    if weights.encoder in CONVVIT_SIZES:
        enc = ConvViT.from_name(weights.encoder, weights.img_size, weights.patch_size)
        try:
            enc.load_state_dict(weights.state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"weights do not fit a {weights.encoder}: {e}") from e
        return enc
    dim, depth, heads = vit_size(weights.encoder)
    enc = ViTEncoder(weights.img_size, weights.patch_size, dim, depth, heads)
    enc.load_state_dict(weights.state, strict=True)
    return enc


def build_timm_vit(
    weights: EncoderWeights,
    num_classes: int,
    pool: str = "mean",
    drop_path: float = 0.0,
) -> VisionTransformer:
    """timm ViT classifier on ``weights`` (MAE fine-tuning head).

    ``pool="mean"``: global average of the patch tokens, a fresh LayerNorm (fc_norm) in place of
    the final norm, Linear head; ``pool="cls"``: the cls token after the pretrained final norm.
    The head is trunc-normal with std 2e-5 (MAE), so the first logits are near zero.
    """
    dim, depth, heads = vit_size(weights.encoder)
    avg = pool == "mean"
    model = VisionTransformer(
        img_size=weights.img_size,
        patch_size=weights.patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=num_classes,
        global_pool="avg" if avg else "token",
        fc_norm=avg,
        drop_path_rate=drop_path,
    )
    missing, unexpected = model.load_state_dict(weights.state, strict=False)
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if avg else set())
    dropped = {"norm.weight", "norm.bias"} if avg else set()
    if set(missing) != fresh or not set(unexpected) <= dropped:
        raise CheckpointError(
            f"encoder weights do not fit a timm ViT: missing {sorted(set(missing) - fresh)}, "
            f"unexpected {sorted(set(unexpected) - dropped)}"
        )
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def build_convvit_classifier(
    weights: EncoderWeights,
    num_classes: int,
    pool: str = "mean",
    drop_path: float = 0.0,
) -> ConvViTClassifier:
    """ConvViT classifier on ``weights``: the counterpart of ``build_timm_vit`` (same pooling,
    fc_norm and head init), with the same key checks: only the head (and fc_norm) are fresh,
    only the final norm (replaced by fc_norm under mean pooling) is left out."""
    enc = ConvViT.from_name(weights.encoder, weights.img_size, weights.patch_size, drop_path)
    model = ConvViTClassifier(enc, num_classes, pool)
    state = {f"encoder.{k}": v for k, v in weights.state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    avg = pool == "mean"
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if avg else set())
    dropped = {"encoder.norm.weight", "encoder.norm.bias"} if avg else set()
    if set(missing) != fresh or not set(unexpected) <= dropped:
        raise CheckpointError(
            f"encoder weights do not fit a {weights.encoder} classifier: missing "
            f"{sorted(set(missing) - fresh)}, unexpected {sorted(set(unexpected) - dropped)}"
        )
    return model


def build_classifier(
    weights: EncoderWeights,
    num_classes: int,
    pool: str = "mean",
    drop_path: float = 0.0,
) -> VisionTransformer | ConvViTClassifier:
    """The fine-tuning model: a timm ViT for ViT weights, a ``ConvViTClassifier`` for ConvViT."""
    if weights.encoder in CONVVIT_SIZES:
        return build_convvit_classifier(weights, num_classes, pool, drop_path)
    return build_timm_vit(weights, num_classes, pool, drop_path)


# ---------------------------------------------------------------------------------------------
# segmentation backbones (cmae.models.upernet)


def load_pyramid(backbone: ViTPyramid | ConvViTPyramid, weights: EncoderWeights) -> None:
    """The pretrained encoder ``weights`` into a segmentation backbone.

    ViT (timm names): the position embedding resampled (bicubic, timm) from the pretraining grid
    to the crop's, bit-exact when the grids agree; only layer scale, the relative position
    tables and the pyramid convolutions stay fresh, only the final norm is left out. ConvViT:
    its own names, strict; the fixed sin-cos embedding recomputed for the crop's grid."""
    state = dict(weights.state)
    if isinstance(backbone, ConvViTPyramid):
        pe = backbone.encoder.pos_embed
        state["pos_embed"] = sincos_pos_embed(pe.shape[-1], backbone.encoder.grid)[None].to(
            pe.dtype
        )
        try:
            backbone.encoder.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"weights do not fit a {weights.encoder}: {e}") from e
        return
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], backbone.grid)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not k.endswith((".gamma", "relative_position_bias_table"))]
    fresh = [k for k in fresh if not k.startswith("fpn")]
    extra = [k for k in unexpected if k not in ("norm.weight", "norm.bias")]
    if fresh or extra:
        raise CheckpointError(
            f"encoder weights do not fit a {weights.encoder} backbone: missing {fresh}, "
            f"unexpected {extra}"
        )


def segmentor_for(weights: EncoderWeights, num_classes: int, crop_size: int, **kwargs) -> UperNet:
    """UperNet (``cmae.models.upernet.build_segmentor``, its ``kwargs``) on the pretrained
    encoder ``weights`` for ``crop_size`` inputs."""
    model = build_segmentor(weights.encoder, weights.patch_size, num_classes, crop_size, **kwargs)
    load_pyramid(model.backbone, weights)  # draws no random numbers: the heads' init is as built
    return model
