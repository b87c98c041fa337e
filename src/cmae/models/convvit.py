"""Hybrid convolutional ViT encoder (ConvViT, ConvMAE-style: Gao et al., arXiv 2205.03892).

The encoder of the paper's strongest model ("CMAE-Base": 85.3 % ImageNet top-1). Three stages:

1. patch embedding (strided conv, stride ``patch_size / 4``) + conv blocks at 1/4 resolution,
2. patch merging (2x2 strided conv) + conv blocks at 1/8,
3. patch merging (2x2 strided conv) to the 1/16 token grid + a cls token + transformer blocks.

A conv block is ConvMAE's: LN -> 1x1 -> 5x5 depth-wise conv -> 1x1 (residual), LN -> MLP
(residual), on channels-last maps. With ``patch_size`` 16 (224 px) the strides are 4 / 2 / 2;
the 32 px CPU presets use patch 4, strides 1 / 2 / 2, so the token grid is 8x8 as for ViT-Tiny.

Masking is decided on the final token grid (``cmae.models.cmae.random_masking``, 2x2 blocks and
all) and upsampled to the earlier stages, where it is applied as **masked convolution**: masked
positions are zeroed before every spatial conv (patch embeddings, patch merging, depth-wise
convs), so no visible feature ever mixes in masked content. The per-position layers (LayerNorm,
1x1 / Linear, MLP, residual adds) cannot carry content across positions, so they need no mask; no
BatchNorm (its batch statistics would leak). Stage 3 gathers the visible tokens only, as the ViT
does.

Interface: the same as ``cmae.models.vit.ViTEncoder`` (``forward(imgs, ids_keep, final_norm) ->
[N, 1 + K, D]``, ``init_weights``, ``no_weight_decay``, ``embed_dim``, ``patch_size`` = the total
stride). Stage 3 keeps a cls token (fixed zero position embedding, as the ViT's) so the decoders,
pooling and the kNN / linear-probe code that drop or read index 0 work unchanged; ConvMAE itself
has none and mean-pools, which ``pool="mean"`` does here too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor

from cmae.models.sizes import CONVVIT_SIZES
from cmae.models.vit import LayerNorm, init_module, sincos_pos_embed

MERGE = 2  # patch-merging stride between stages (1/4 -> 1/8 -> 1/16)


def upsample_mask(visible: Tensor, r: int) -> Tensor:
    """Token-grid visibility [N, g, g] (1 = visible) -> [N, g*r, g*r, 1]: each token's value over
    its r x r cells of a finer (channels-last) map."""
    n, g, _ = visible.shape
    return visible[:, :, None, :, None, None].expand(n, g, r, g, r, 1).reshape(n, g * r, g * r, 1)


def _masked(x: Tensor, visible: Tensor | None) -> Tensor:
    return x if visible is None else x * visible.to(x.dtype)


class PatchMerge(nn.Module):
    """Non-overlapping strided conv (kernel = stride) + LayerNorm, channels-last in and out:
    [N, H, W, C_in] -> [N, H/s, W/s, C_out]."""

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, stride, stride=stride)
        self.norm = LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvBlock(nn.Module):
    """ConvMAE's convolutional block on channels-last maps [N, H, W, C].

    x + proj_out(dwconv(mask * proj_in(LN(x)))), then x + MLP(LN(x)); ``proj_in`` / ``proj_out``
    are ConvMAE's 1x1 convs, written as Linear layers on the channel axis.
    """

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 5, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.proj_in = nn.Linear(dim, dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj_out = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """x [N, H, W, C]; visible [N, H, W, 1] (1 = visible) or None for the full image."""
        y = _masked(self.proj_in(self.norm1(x)), visible)  # masked conv: masked cells enter as 0
        y = self.dwconv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.proj_out(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvViT(nn.Module):
    """Two conv stages + a transformer stage; the ``ViTEncoder`` interface (see module doc)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dims: tuple[int, int, int] = (256, 384, 768),
        depths: tuple[int, int, int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if patch_size % (MERGE * MERGE) or img_size % patch_size:
            raise ValueError(
                f"ConvViT: patch_size {patch_size} must be a multiple of {MERGE * MERGE} and "
                f"divide img_size {img_size}"
            )
        d1, d2, d3 = embed_dims
        self.img_size = img_size
        self.patch_size = patch_size  # total stride: the pixel decoder predicts p*p*3 per token
        self.embed_dim = d3
        self.grid = img_size // patch_size
        self.strides = (patch_size // (MERGE * MERGE), MERGE, MERGE)
        # stochastic depth rises linearly over all blocks of the three stages (ConvMAE)
        dpr = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()  # also on meta
        a, b = depths[0], depths[0] + depths[1]
        dpr1, dpr2, dpr3 = dpr[:a], dpr[a:b], dpr[b:]

        # stage 1: 1/4 of the image (1/1 at 32 px)
        self.patch_embed1 = PatchMerge(3, d1, self.strides[0])
        self.blocks1 = nn.ModuleList(ConvBlock(d1, mlp_ratio, drop_path=p) for p in dpr1)
        # stage 2: 1/8
        self.patch_embed2 = PatchMerge(d1, d2, MERGE)
        self.blocks2 = nn.ModuleList(ConvBlock(d2, mlp_ratio, drop_path=p) for p in dpr2)
        # stage 3: 1/16 tokens, cls token, fixed sin-cos position embedding, transformer blocks
        self.patch_embed3 = PatchMerge(d2, d3, MERGE)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d3))
        self.pos_embed = nn.Parameter(sincos_pos_embed(d3, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(d3, num_heads, mlp_ratio, qkv_bias=True, drop_path=p, norm_layer=LayerNorm)
            for p in dpr3
        )
        self.norm = LayerNorm(d3)

    @classmethod
    def from_name(
        cls, name: str, img_size: int, patch_size: int, drop_path: float = 0.0
    ) -> ConvViT:
        """A size of ``CONVVIT_SIZES`` (``convvit_tiny`` / ``_small`` / ``_base``)."""
        dims, depths, heads = CONVVIT_SIZES[name]
        return cls(img_size, patch_size, dims, depths, heads, drop_path=drop_path)

    def init_weights(self) -> None:
        # MAE's init for the transformer part (xavier Linear, unit LN, cls N(0, 0.02)); the patch
        # embeddings like MAE's (xavier on the flattened kernel); depth-wise convs keep PyTorch's
        # default, as in ConvMAE
        self.apply(init_module)
        for pe in (self.patch_embed1, self.patch_embed2, self.patch_embed3):
            w = pe.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(pe.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_stages(
        self, imgs: Tensor, visible: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-1 and stage-2 maps and the stage-3 token map, channels-last:
        [N, H/4, W/4, C1], [N, H/8, W/8, C2], [N, g, g, D] (strides for patch 16).

        ``visible`` [N, g, g] (1 = visible token) masks every spatial conv; None = full image.
        """
        s1, s2, s3 = self.strides
        v0 = v1 = v2 = None
        if visible is not None:
            v0 = upsample_mask(visible, s1 * s2 * s3)  # pixels
            v1 = upsample_mask(visible, s2 * s3)  # stage 1
            v2 = upsample_mask(visible, s3)  # stage 2
        x = self.patch_embed1(_masked(imgs.permute(0, 2, 3, 1), v0))
        for blk in self.blocks1:
            x = blk(x, v1)
        f1 = x
        x = self.patch_embed2(_masked(x, v1))
        for blk in self.blocks2:
            x = blk(x, v2)
        f2 = x
        return f1, f2, self.patch_embed3(_masked(x, v2))

    def forward(
        self, imgs: Tensor, ids_keep: Tensor | None = None, final_norm: bool = True
    ) -> Tensor:
        """[N, 3, H, W] -> [N, 1 + K, D]; only the tokens in ids_keep [N, K] if given (the rest
        is masked in the conv stages too)."""
        visible = None
        if ids_keep is not None:
            n, g = imgs.shape[0], self.grid
            visible = imgs.new_zeros(n, g * g).scatter_(1, ids_keep, 1.0).view(n, g, g)
        return self.forward_transformer(self.forward_stages(imgs, visible)[2], ids_keep, final_norm)

    def forward_transformer(
        self, x: Tensor, ids_keep: Tensor | None = None, final_norm: bool = True
    ) -> Tensor:
        """Stage 3: token map [N, g, g, D] -> [N, 1 + K, D] (the ids_keep tokens, if given)."""
        x = x.flatten(1, 2) + self.pos_embed[:, 1:]  # [N, L, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def forward_multiscale(self, imgs: Tensor) -> list[Tensor]:
        """Feature maps of the full image for dense tasks, channels first: stage 1, stage 2 and
        the final tokens (after the final norm, cls dropped) -- [N, C1, H/4, W/4],
        [N, C2, H/8, W/8], [N, D, H/16, W/16] for patch 16."""
        f1, f2, x = self.forward_stages(imgs)
        f3 = self.forward_transformer(x)[:, 1:].reshape(x.shape)
        return [f.permute(0, 3, 1, 2) for f in (f1, f2, f3)]


class ConvViTClassifier(nn.Module):
    """Fine-tuning model around a pretrained ConvViT (timm's ``VisionTransformer`` cannot hold
    it): the encoder on the full image, then (MAE) the mean of the patch tokens + a fresh
    LayerNorm (``fc_norm``, replacing the encoder's final norm) + Linear head, or with
    ``pool="cls"`` the cls token after the pretrained final norm.

    Layer-wise lr decay (``layer_id``): stage 1 is layer 0, stage 2 layer 1, the stage-3 token
    embedding (patch merging, cls token, pos-embed: the ViT's layer 0) layer 2, transformer
    block i layer 3 + i, final norm / fc_norm / head the last layer.
    """

    def __init__(self, encoder: ConvViT, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.pool = pool
        self.encoder = encoder
        dim = encoder.embed_dim
        if pool == "mean":
            encoder.norm = nn.Identity()
        self.fc_norm = LayerNorm(dim) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        # MAE: near-zero first logits
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks) + 4

    def layer_id(self, name: str) -> int:
        """The layer-decay layer of parameter ``name`` (see the class doc)."""
        return convvit_layer_id(name, self.num_layers - 1)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, imgs: Tensor) -> Tensor:
        x = self.encoder(imgs)  # [N, 1 + L, D]
        x = x[:, 1:].mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.head(self.fc_norm(x))


def convvit_layer_id(name: str, last: int) -> int:
    """The layer-decay layer of a model parameter ``name`` whose ConvViT sits under
    ``encoder.``: stage 1 -> 0, stage 2 -> 1, the stage-3 embedding and tokens -> 2, block i ->
    3 + i; everything else (heads, norms outside the encoder) -> ``last``."""
    parts = name.split(".")
    part = parts[1] if parts[0] == "encoder" and len(parts) > 1 else ""
    if part in ("patch_embed1", "blocks1"):
        return 0
    if part in ("patch_embed2", "blocks2"):
        return 1
    if part in ("patch_embed3", "cls_token", "pos_embed"):
        return 2
    if part == "blocks":
        return 3 + int(parts[2])
    return last
