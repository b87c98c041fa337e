"""Semantic segmentation on a pretrained encoder: a feature pyramid + UperNet, the MAE / BEiT
ADE20K protocol (mmsegmentation's ``mae-base_upernet``), on torch and timm alone.

ViT: the outputs of 4 evenly spaced blocks (ViT-B: 3, 5, 7, 11; no final norm, as the
reference backbone), the position embedding resampled to the crop's grid once, then a pyramid
at 4x, 2x, 1x and 0.5x the token grid: ConvTranspose-BN-GELU-ConvTranspose, ConvTranspose,
identity, max-pool (1/4 .. 1/32 of the image for patch 16). Optional, off by default: a relative
position bias per block initialised to zero and layer scale (the reference's MAE backbone has
both: ``rel_pos_bias=true``, ``layer_scale=1.0``). ConvViT: its native stage maps from
``forward_multiscale`` plus a max-pooled 1/32 map (ConvMAE).

Heads: UperNet (pyramid pooling 1, 2, 3, 6 on the coarsest level + FPN fusion of all four) and
an FCN auxiliary head on level 3 (1/16), each Conv-BN-ReLU with dropout 0.1 before the 1x1
classifier, as mmsegmentation's ``UPerHead`` / ``FCNHead``.

This file builds the model with fresh weights; the pretrained encoder's weights are loaded by
``cmae.interop.encoders.load_pyramid`` (``segmentor_for`` does both).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from cmae.models.convvit import ConvViT, convvit_layer_id
from cmae.models.sizes import CONVVIT_SIZES, vit_size
from cmae.models.vit import sincos_pos_embed

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the pyramid: ViT-B (12) 3, 5, 7, 11; ViT-L (24) 7, 11, 15, 23
    (the MAE / BEiT choice: the ends of the first third, half, two thirds and the last block;
    the ends of its quarters where those coincide)."""
    if depth < 4:
        raise ValueError(f"a pyramid of 4 levels needs at least 4 blocks, the encoder has {depth}")
    taps = (depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1)
    if len(set(taps)) < 4:  # very shallow encoders: the ends of its quarters
        taps = tuple(round((k + 1) * depth / 4) - 1 for k in range(4))
    return taps


# ---------------------------------------------------------------------------------------------
# ViT backbone


class RelPosAttention(nn.Module):
    """timm's ``Attention`` (same parameter names: loads the pretrained qkv / proj) plus a
    learned relative position bias per head over a fixed ``grid`` and the cls token, BEiT's
    table layout, initialised to zero so the first step equals the plain encoder."""

    def __init__(self, attn: Attention, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        self.grid = grid
        gh, gw = grid
        n_rel = (2 * gh - 1) * (2 * gw - 1)
        # + 3: cls-to-token, token-to-cls, cls-to-cls
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel + 3, self.num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"))
        coords = coords.flatten(1)  # [2, L]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [L, L, 2]
        rel[..., 0] += gh - 1
        rel[..., 1] += gw - 1
        index = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long)
        index[1:, 1:] = rel[..., 0] * (2 * gw - 1) + rel[..., 1]
        index[0, 1:], index[1:, 0], index[0, 0] = n_rel, n_rel + 1, n_rel + 2
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        b, n, c = x.shape
        if n != self.relative_position_index.shape[0]:
            raise ValueError(
                f"relative position bias is defined on a {self.grid} grid (+ cls), got {n} tokens"
            )
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class ViTPyramid(nn.Module):
    """A ViT encoder as a 4-level feature pyramid (see the module doc); timm parameter names,
    so pretrained encoder weights load with key checks (``cmae.interop.encoders.load_pyramid``)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        crop_size: int,
        out_indices: tuple[int, ...] | None = None,
        drop_path: float = 0.1,
        rel_pos_bias: bool = False,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if crop_size % patch_size:
            raise ValueError(f"crop size {crop_size} is not a multiple of the patch {patch_size}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.out_indices = tuple(out_indices or default_out_indices(depth))
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices: 4 block indices in [0, {depth}), got {out_indices}")
        self.grid = (crop_size // patch_size,) * 2
        self.patch_embed = PatchEmbed(
            crop_size, patch_size, 3, embed_dim, strict_img_size=False, dynamic_img_pad=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # trainable here (the reference's segmentation backbone learns it), initialised from
        # the pretrained one (``load_pyramid``)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(embed_dim, self.grid[0])[None].clone(), requires_grad=True
        )
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                4.0,
                qkv_bias=True,
                init_values=layer_scale,
                drop_path=dpr[i],
                norm_layer=LayerNorm,
            )
            for i in range(depth)
        )
        if rel_pos_bias:
            for blk in self.blocks:
                blk.attn = RelPosAttention(blk.attn, self.grid)
        d = embed_dim
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(d, d, 2, 2),
            nn.BatchNorm2d(d),
            nn.GELU(),
            nn.ConvTranspose2d(d, d, 2, 2),
        )
        self.fpn2 = nn.ConvTranspose2d(d, d, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)
        self.channels = (d, d, d, d)
        self.strides = (patch_size // 4, patch_size // 2, patch_size, patch_size * 2)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay layer: embeddings 0, block i i + 1, the rest ``depth + 1``."""
        part = name.split(".")[0]
        if part in ("patch_embed", "cls_token", "pos_embed"):
            return 0
        if part == "blocks":
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    @property
    def num_layers(self) -> int:
        return self.depth + 2

    def forward(self, x: Tensor) -> list[Tensor]:
        n, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        pos = self.pos_embed
        if (gh, gw) != self.grid:  # another input size (whole-image inference): resampled
            pos = resample_pos_embed(pos, (gh, gw))
        x = self.patch_embed(x) + pos[:, 1:]
        x = torch.cat([(self.cls_token + pos[:, :1]).expand(n, -1, -1), x], dim=1)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(n, -1, gh, gw))
        return [
            fpn(f)
            for fpn, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats, strict=True)
        ]


def resample_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + gh*gw, D] (bicubic, timm's resampler); unchanged at ``grid``."""
    old = math.isqrt(pos.shape[1] - 1)
    if (old, old) == tuple(grid):
        return pos
    return resample_abs_pos_embed(
        pos, new_size=list(grid), old_size=[old, old], num_prefix_tokens=1
    )


class ConvViTPyramid(nn.Module):
    """A ConvViT's stage-1, stage-2 and final maps (``forward_multiscale``) + a max-pooled 4th
    level, as ConvMAE's segmentation backbone (1/4, 1/8, 1/16, 1/32 for patch 16)."""

    def __init__(self, name: str, patch_size: int, crop_size: int, drop_path: float = 0.1) -> None:
        super().__init__()
        self.encoder = ConvViT.from_name(name, crop_size, patch_size, drop_path)
        dims = CONVVIT_SIZES[name][0]
        self.channels = (dims[0], dims[1], dims[2], dims[2])
        s = self.encoder.strides
        self.strides = (s[0], s[0] * s[1], patch_size, patch_size * 2)
        self.pool = nn.MaxPool2d(2, 2)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        """ConvViTClassifier's layers: stage 1 0, stage 2 1, stage-3 embedding 2, block i
        3 + i, the rest ``depth + 3``."""
        return convvit_layer_id(name, self.depth + 3)

    @property
    def num_layers(self) -> int:
        return self.depth + 4

    def forward(self, x: Tensor) -> list[Tensor]:
        f1, f2, f3 = self.encoder.forward_multiscale(x)
        return [f1, f2, f3, self.pool(f3)]


# ---------------------------------------------------------------------------------------------
# heads


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """Pyramid pooling on the last level, top-down FPN fusion, 3x3 fusion of all levels at the
    finest resolution, dropout and a 1x1 classifier (logits at level 1's resolution)."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(ConvBNReLU(in_channels[-1], channels, 1) for _ in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [
            _resize(conv(F.adaptive_avg_pool2d(top, s)), top.shape[2:])
            for s, conv in zip(self.pool_scales, self.ppm, strict=True)
        ]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [
            laterals[-1]
        ]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], 1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 Conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """Backbone pyramid + UperNet head (+ FCN auxiliary head on level ``aux_level``, training
    only). ``forward`` returns (logits, aux logits or None) at their own resolutions."""

    def __init__(
        self,
        backbone: ViTPyramid | ConvViTPyramid,
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_level: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UperHead(backbone.channels, channels, num_classes, pool_scales, dropout)
        self.aux_level = aux_level
        self.auxiliary_head = (
            FCNHead(backbone.channels[aux_level], aux_channels, num_classes, dropout)
            if aux_channels
            else None
        )

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def pad_multiple(self) -> int:
        """Input sides must be multiples of this (the coarsest level's stride)."""
        return self.backbone.strides[-1]

    def layer_id(self, name: str) -> int:
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.num_layers - 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        feats = self.backbone(x)
        logits = self.decode_head(feats)
        aux = None
        if self.training and self.auxiliary_head is not None:
            aux = self.auxiliary_head(feats[self.aux_level])
        return logits, aux


def build_segmentor(
    encoder: str,
    patch_size: int,
    num_classes: int,
    crop_size: int,
    channels: int = 768,
    aux_channels: int = 256,
    pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    dropout: float = 0.1,
    drop_path: float = 0.1,
    out_indices: tuple[int, ...] | None = None,
    rel_pos_bias: bool = False,
    layer_scale: float | None = None,
) -> UperNet:
    """UperNet on a fresh ``encoder`` (any ViT size, preset or ``vit_{W}x{D}h{H}``, or a
    ConvViT) of ``patch_size`` for ``crop_size`` inputs."""
    if encoder in CONVVIT_SIZES:
        if rel_pos_bias or layer_scale is not None or out_indices is not None:
            raise ValueError(
                "model.rel_pos_bias / layer_scale / out_indices: for ViT encoders only (a ConvViT "
                "gives its stage maps)"
            )
        backbone: ViTPyramid | ConvViTPyramid = ConvViTPyramid(
            encoder, patch_size, crop_size, drop_path
        )
    else:
        size = vit_size(encoder)
        if size is None:
            raise ValueError(f"unknown encoder {encoder!r}")
        dim, depth, heads = size
        backbone = ViTPyramid(
            dim,
            depth,
            heads,
            patch_size,
            crop_size,
            out_indices,
            drop_path,
            rel_pos_bias,
            layer_scale,
        )
    model = UperNet(backbone, num_classes, channels, aux_channels, pool_scales, dropout)
    # the pyramid and head convolutions keep PyTorch's init; the classifiers N(0, 0.01), as
    # mmsegmentation's decode heads
    for head in (model.decode_head, model.auxiliary_head):
        if head is not None:
            nn.init.normal_(head.conv_seg.weight, std=0.01)
            nn.init.zeros_(head.conv_seg.bias)
    return model
