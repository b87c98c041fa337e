"""Object detection and instance segmentation on a pretrained encoder: ViTDet's backbone and
simple feature pyramid (Li et al. 2022, arXiv 2203.16527) under torchvision's Mask R-CNN.

API::

    model = build_detector(encoder, num_classes=2, img_size=1024, image_mean=..., image_std=...)
    model.train();  losses = model(images, targets)   # dict of 5 losses (torchvision's names)
    model.eval();   preds = model(images)             # [{"boxes", "labels", "scores", "masks"}]

``encoder`` is an already built (and loaded) ``ViTEncoder`` or ``ConvViT``; the builder takes its
modules over and never reads files. ``images`` is a list of float [3, h, w] tensors in [0, 1] with
h, w <= ``img_size``: the model only normalises (``image_mean`` / ``image_std``) and pads them to
the ``img_size`` square (bottom / right), it never resizes (``PadOnlyTransform``); resizing and
jitter are the data pipeline's. ``targets``: torchvision's dicts (``boxes`` [K, 4] xyxy pixels,
``labels`` [K] int64 in 1..num_classes-1 (0 is background), ``masks`` [K, h, w] uint8).
Outputs come back in the input image's pixels. Under autocast (bf16 / fp16) the layers run in
its dtype but every box coordinate stays fp32: the pyramid maps (torchvision makes its anchors in
their dtype) and the RPN and box predictors' outputs (decoded in their dtype) are cast to fp32,
as detectron2 decodes its boxes in fp32. For the optimizer the model has ``num_layers``,
``layer_id(name)`` and ``no_weight_decay()`` (``cmae.runtime.optim.layer_decay_groups``).

ViT backbone, as detectron2's ``ViT`` + ``SimpleFeaturePyramid``: the encoder's patch embedding,
its position embedding (trainable, kept at the pretraining grid and resampled bicubically to the
input's grid in every forward, so the parameter count is the encoder's) and its blocks, without
the cls token and the final norm. Window attention (``window_size``, inputs to a block padded to a
multiple of the window, padding removed after the attention) in all blocks but the global ones
(``default_global_blocks``: 2, 5, 8, 11 for 12 blocks); optional decomposed relative position
embeddings (MViTv2 / ViTDet: per-axis tables of head_dim channels, zero init, so the model equals
the plain encoder at init); drop path rising linearly to ``drop_path``. The pyramid from the
stride-16 map: x4 (deconv to D/2, LN, GELU, deconv to D/4), x2 (deconv to D/2), x1, x0.5
(max-pool), each then 1x1 conv + LN and 3x3 conv + LN to ``out_channels``, plus P6 = P5
subsampled by 2 for the RPN. ConvViT: its own stage maps (``forward_multiscale``: 1/4, 1/8,
1/16 for patch 16) + a max-pooled 1/32, each through the same 1x1 + 3x3 output convs.

Heads: torchvision's (2-conv RPN; anchors 32..512 on P2..P6 with ratios 0.5, 1, 2; 4-conv-1-fc
box head and 4-conv mask head with LayerNorm; ``num_rois`` sampled RoIs per image), detectron2's
ViTDet settings where torchvision's defaults differ (1000 proposals per image after NMS in
training). Known differences from detectron2: torchvision's RoIAlign is not the half-pixel
aligned one (``aligned=False``, sampling ratio 2) and its box predictor has a background row.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cmae.models.convvit import ConvBlock, ConvViT, convvit_layer_id
from cmae.models.upernet import resample_pos_embed
from cmae.models.vit import ViTEncoder

ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per level, P2..P6
ASPECT_RATIOS = (0.5, 1.0, 2.0)
FEATURE_NAMES = ("0", "1", "2", "3")  # P2..P5, the RoI levels (torchvision's default names)


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """Four evenly spaced global-attention blocks, the last block among them: the ends of the
    encoder's quarters (12 blocks: 2, 5, 8, 11; 24: 5, 11, 17, 23; 32: 7, 15, 23, 31). With 4
    or fewer blocks every block is global."""
    if depth <= 4:
        return tuple(range(depth))
    return tuple((k + 1) * depth // 4 - 1 for k in range(4))


# ---------------------------------------------------------------------------------------------
# window attention with decomposed relative position embeddings


def window_partition(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nW, size, size, C], zero-padded at the bottom / right to multiples
    of ``size``; also the padded (H, W)."""
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // size, size, wp // size, size, c).transpose(2, 3)
    return x.reshape(-1, size, size, c), (hp, wp)


def window_unpartition(
    windows: Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]
) -> Tensor:
    """Inverse of ``window_partition``: [B * nW, size, size, C] -> [B, H, W, C], padding cut."""
    (hp, wp), (h, w) = padded, hw
    c = windows.shape[-1]
    x = windows.view(-1, hp // size, wp // size, size, size, c).transpose(2, 3)
    return x.reshape(-1, hp, wp, c)[:, :h, :w]


def relative_embeddings(table: Tensor, n: int) -> Tensor:
    """A per-axis table [2L - 1, C] -> the embedding of every (query, key) offset on an axis of
    length ``n``: [n, n, C], entry [i, j] = table row i - j + n - 1. The table is resampled
    (linear) when it was made for another length, as ViTDet does at a new input size."""
    if table.shape[0] != 2 * n - 1:
        table = F.interpolate(table.T[None], size=2 * n - 1, mode="linear")[0].T
    pos = torch.arange(n, device=table.device)
    return table[pos[:, None] - pos[None, :] + n - 1]


def decomposed_rel_pos_bias(
    q: Tensor, table_h: Tensor, table_w: Tensor, hw: tuple[int, int]
) -> Tensor:
    """The additive attention bias of MViTv2's decomposed relative positions:
    bias[(y, x), (y', x')] = q_(y,x) . Rh[y - y'] + q_(y,x) . Rw[x - x'].

    q [B, heads, h*w, c] (unscaled) -> [B, heads, h*w, h*w]."""
    b, heads, _, c = q.shape
    h, w = hw
    rq = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", rq, relative_embeddings(table_h, h))  # [.., h, w, h]
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", rq, relative_embeddings(table_w, w))  # [.., h, w, w]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, heads, h, w, h, w]
    return bias.reshape(b, heads, h * w, h * w)


class WindowAttention(nn.Module):
    """timm's ``Attention`` (its qkv / proj, same names) on a 2-D token map [B, h, w, C], with
    optional decomposed relative position tables ``rel_pos_h`` / ``rel_pos_w`` [2n - 1, head_dim]
    for an ``size`` = (n_h, n_w) map, zero-initialised."""

    def __init__(self, attn: Attention, size: tuple[int, int], rel_pos: bool) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("window attention: gated attention is not supported")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        # timm's optional norm before the projection (Identity unless scale_norm; older timm
        # versions have none)
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = attn.proj
        self.rel_pos_h = self.rel_pos_w = None
        if rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, n, c]
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if self.rel_pos_h is not None:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.norm(x.transpose(1, 2).reshape(b, h, w, -1))
        return self.proj(x)


class ViTDetBlock(nn.Module):
    """A timm ``Block`` (same parameter names) on a token map [B, H, W, C]: window attention when
    ``window_size`` > 0 (the map padded to whole windows around the attention only), global
    attention otherwise; a fresh drop path."""

    def __init__(
        self, block: Block, window_size: int, grid: tuple[int, int], rel_pos: bool, drop_path: float
    ) -> None:
        super().__init__()
        self.window_size = window_size
        size = (window_size, window_size) if window_size else grid
        self.norm1, self.ls1 = block.norm1, block.ls1
        self.attn = WindowAttention(block.attn, size, rel_pos)
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        if self.window_size:
            hw = (x.shape[1], x.shape[2])
            y, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(y), self.window_size, padded, hw)
        else:
            y = self.attn(y)
        x = x + self.drop_path(self.ls1(y))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class WindowedViT(nn.Module):
    """The plain ViT trunk of ViTDet: [N, 3, H, W] -> the last block's map [N, D, H/p, W/p]."""

    def __init__(
        self,
        encoder: ViTEncoder,
        grid: tuple[int, int],
        window_size: int,
        global_blocks: tuple[int, ...],
        rel_pos_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = encoder.patch_size, encoder.embed_dim
        # the conv alone: timm's PatchEmbed would insist on the pretraining image size
        self.patch_embed = encoder.patch_embed
        # trainable from here on (ViTDet fine-tunes it); the cls position is kept so the
        # parameter loads as it is, and dropped in forward
        self.pos_embed = encoder.pos_embed
        self.pos_embed.requires_grad_(True)
        depth = len(encoder.blocks)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.global_blocks = tuple(global_blocks)
        self.blocks = nn.ModuleList(
            ViTDetBlock(
                blk, 0 if i in self.global_blocks else window_size, grid, rel_pos_bias, dpr[i]
            )
            for i, blk in enumerate(encoder.blocks)
        )

    def forward(self, imgs: Tensor) -> Tensor:
        x = self.patch_embed.proj(imgs).permute(0, 2, 3, 1)  # [N, h, w, D]
        h, w = x.shape[1:3]
        pos = resample_pos_embed(self.pos_embed, (h, w))[:, 1:]  # [1, h*w, D]
        x = x + pos.reshape(1, h, w, -1)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# feature pyramids


def output_convs(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + LN, 3x3 conv + LN (no conv biases: the LN follows), channels first."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        LayerNorm2d(cout),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        LayerNorm2d(cout),
    )


def with_p6(levels: list[Tensor]) -> OrderedDict[str, Tensor]:
    """P2..P5 + P6 (P5 subsampled by 2, the RPN's extra level) under torchvision's names, fp32."""
    # fp32 maps: torchvision makes its anchors in the maps' dtype, and bf16 anchors would sit on
    # a 2-8 px lattice at 256-2048 px (the convs that read the maps still run in autocast's dtype)
    levels = [f.float() for f in levels]
    out = OrderedDict(zip(FEATURE_NAMES, levels, strict=True))
    out["pool"] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)
    return out


class SimpleFeaturePyramid(nn.Module):
    """One stride-s map [N, D, h, w] -> maps at strides s/4, s/2, s, 2s with ``out_channels``."""

    def __init__(self, dim: int, out_channels: int = 256) -> None:
        super().__init__()
        self.scale4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        )
        self.scale2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.scale05 = nn.MaxPool2d(2, stride=2)
        self.outputs = nn.ModuleList(
            output_convs(c, out_channels) for c in (dim // 4, dim // 2, dim, dim)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = (self.scale4(x), self.scale2(x), x, self.scale05(x))
        return [conv(m) for conv, m in zip(self.outputs, maps, strict=True)]


class ViTDetBackbone(nn.Module):
    """``WindowedViT`` + ``SimpleFeaturePyramid`` + P6: [N, 3, S, S] -> OrderedDict of 5 maps
    (strides p/4, p/2, p, 2p, 4p) with ``out_channels`` each, as torchvision's detectors take."""

    def __init__(
        self,
        encoder: ViTEncoder,
        img_size: int,
        window_size: int,
        global_blocks: tuple[int, ...],
        rel_pos_bias: bool,
        drop_path: float,
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        p = encoder.patch_size
        grid = (img_size // p, img_size // p)
        self.encoder = WindowedViT(
            encoder, grid, window_size, global_blocks, rel_pos_bias, drop_path
        )
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, out_channels)
        self.out_channels = out_channels
        self.strides = (p // 4, p // 2, p, 2 * p, 4 * p)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay layer (detectron2's ``get_vit_lr_decay_rate``): patch and position
        embeddings 0, block i i + 1, the pyramid (and the heads) ``depth + 1``."""
        parts = name.split(".")
        if parts[0] == "encoder" and parts[1] in ("patch_embed", "pos_embed"):
            return 0
        if parts[0] == "encoder" and parts[1] == "blocks":
            return int(parts[2]) + 1
        return self.num_layers - 1

    def no_weight_decay(self) -> set[str]:
        # ViTDet's recipe: only the absolute position embedding is exempt by name (norms and
        # biases are 1-D, exempt by shape); the relative position tables are decayed
        return {"encoder.pos_embed"}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return with_p6(self.pyramid(self.encoder(x)))


class ConvViTDetBackbone(nn.Module):
    """A ConvViT's stage-1, stage-2 and final maps + a max-pooled 4th level, each through
    ``output_convs``, + P6 (strides p/4, p/2, p, 2p, 4p)."""

    def __init__(
        self, encoder: ConvViT, img_size: int, drop_path: float, out_channels: int = 256
    ) -> None:
        super().__init__()
        p, g = encoder.patch_size, img_size // encoder.patch_size
        # resampled once (the ConvViT adds its embedding as it is); trainable, as for the ViT
        encoder.pos_embed = nn.Parameter(resample_pos_embed(encoder.pos_embed.detach(), (g, g)))
        encoder.img_size, encoder.grid = img_size, g
        blocks = [*encoder.blocks1, *encoder.blocks2, *encoder.blocks]
        for blk, rate in zip(
            blocks, torch.linspace(0, drop_path, len(blocks)).tolist(), strict=True
        ):
            path = DropPath(rate) if rate > 0 else nn.Identity()
            if isinstance(blk, ConvBlock):
                blk.drop_path = path
            else:
                blk.drop_path1, blk.drop_path2 = path, path
        self.encoder = encoder
        d1, d2 = encoder.patch_embed1.proj.out_channels, encoder.patch_embed2.proj.out_channels
        dims = (d1, d2, encoder.embed_dim, encoder.embed_dim)
        self.outputs = nn.ModuleList(output_convs(c, out_channels) for c in dims)
        self.out_channels = out_channels
        self.strides = (p // 4, p // 2, p, 2 * p, 4 * p)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks) + 4

    def layer_id(self, name: str) -> int:
        """``ConvViTClassifier``'s layers: stage 1 0, stage 2 1, stage-3 embedding 2, block i
        3 + i, the output convs (and the heads) ``depth + 3``."""
        return convvit_layer_id(name, self.num_layers - 1)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        f1, f2, f3 = self.encoder.forward_multiscale(x)
        maps = (f1, f2, f3, F.max_pool2d(f3, 2, stride=2))
        return with_p6([conv(m) for conv, m in zip(self.outputs, maps, strict=True)])


# ---------------------------------------------------------------------------------------------
# the detector


class PadOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's detection input transform without its resize: normalise, then pad every
    image to the ``size`` square (``size_divisible`` = size). Larger images are an error."""

    def __init__(self, size: int, image_mean: list[float], image_std: list[float]) -> None:
        super().__init__(size, size, image_mean, image_std, size_divisible=size)
        self.size = size

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        if h > self.size or w > self.size:
            raise ValueError(
                f"detector input {h}x{w} is larger than its {self.size}x{self.size} square; "
                "resize it in the data pipeline"
            )
        return image, target


class RPNHeadFp32(RPNHead):
    """torchvision's RPN head, its outputs in fp32: the proposals are decoded from them (in their
    dtype), and bf16 boxes would be 4-8 px coarse at 512-2048 px."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class BoxPredictorFp32(FastRCNNPredictor):
    """torchvision's box predictor, its scores and box deltas in fp32 (as ``RPNHeadFp32``)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class MaskPredictorFp32(MaskRCNNPredictor):
    """torchvision's mask predictor, its logits in fp32 (pasted into the image as they are)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).float()


class ViTDetMaskRCNN(MaskRCNN):
    """torchvision's ``MaskRCNN`` with the layer-decay interface of ``cmae segment``'s UperNet:
    the backbone's layers, the pyramid and every head in the top layer."""

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def layer_id(self, name: str) -> int:
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.num_layers - 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def build_detector(
    encoder: ViTEncoder | ConvViT,
    *,
    num_classes: int,
    img_size: int,
    image_mean: tuple[float, ...] | list[float],
    image_std: tuple[float, ...] | list[float],
    window_size: int = 14,
    global_blocks: tuple[int, ...] | None = None,
    rel_pos_bias: bool = True,
    drop_path: float = 0.1,
    num_rois: int = 512,
    rpn_post_nms_train: int = 1000,
    rpn_post_nms_test: int = 1000,
    detections_per_img: int = 100,
    out_channels: int = 256,
) -> ViTDetMaskRCNN:
    """ViTDet Mask R-CNN on ``encoder`` (see the module doc) for inputs padded to ``img_size``
    squares. ``num_classes`` counts the background (COCO: 81). ``window_size``,
    ``global_blocks`` (None: ``default_global_blocks``) and ``rel_pos_bias`` apply to ViT
    encoders only. ``num_rois``: RoIs sampled per training image for the box head;
    ``rpn_post_nms_*``: proposals kept per image."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background, so at least 2; got {num_classes}")
    p = encoder.patch_size
    if img_size <= 0 or img_size % (4 * p):
        raise ValueError(
            f"img_size {img_size} must be a positive multiple of 4x the patch size {p} "
            "(the pyramid's coarsest levels halve the token grid twice)"
        )
    if min(num_rois, rpn_post_nms_train, rpn_post_nms_test, detections_per_img) <= 0:
        raise ValueError("num_rois, rpn_post_nms_* and detections_per_img must be positive")
    if isinstance(encoder, ConvViT):
        if global_blocks is not None:
            raise ValueError("global_blocks: for ViT encoders only (a ConvViT attends globally)")
        backbone: nn.Module = ConvViTDetBackbone(encoder, img_size, drop_path, out_channels)
    elif isinstance(encoder, ViTEncoder):
        depth = len(encoder.blocks)
        blocks = default_global_blocks(depth) if global_blocks is None else tuple(global_blocks)
        if not all(0 <= i < depth for i in blocks):
            raise ValueError(f"global_blocks must lie in [0, {depth}), got {list(blocks)}")
        if window_size <= 0:
            raise ValueError(f"window_size must be positive, got {window_size}")
        backbone = ViTDetBackbone(
            encoder, img_size, window_size, blocks, rel_pos_bias, drop_path, out_channels
        )
    else:
        raise ValueError(f"build_detector needs a ViTEncoder or ConvViT, got {type(encoder)}")

    c = out_channels
    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * 5)
    model = ViTDetMaskRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHeadFp32(c, len(ASPECT_RATIOS), conv_depth=2),
        rpn_post_nms_top_n_train=rpn_post_nms_train,
        rpn_post_nms_top_n_test=rpn_post_nms_test,
        box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [1024], norm_layer=LayerNorm2d),
        box_predictor=BoxPredictorFp32(1024, num_classes),
        box_batch_size_per_image=num_rois,
        box_detections_per_img=detections_per_img,
        mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskPredictorFp32(c, c, num_classes),
    )
    model.transform = PadOnlyTransform(img_size, list(image_mean), list(image_std))
    return model
