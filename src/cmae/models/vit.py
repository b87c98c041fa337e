"""The plain ViT encoder and the layers its ConvViT sibling and the CMAE decoders share.

Parameter names equal timm's ``VisionTransformer``, so exporting an encoder is a key filter.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding, [grid*grid (+1), dim]; the cls position is zeros.

    Same layout as MAE: the first half of the channels encodes the column (x), the second the
    row (y), each half [sin, cos] over dim / 4 frequencies. The official CMAE code (mmselfsup's
    ``build_2d_sincos_position_embedding``) puts the halves the other way round (row first);
    otherwise equal. Imported official weights keep theirs: the embeddings are state-dict
    entries, copied as they are (``cmae.interop.export.load_official``), never recomputed.
    """
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # [L, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)  # [L, dim/2]

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # [L, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def init_module(m: nn.Module) -> None:
    """MAE init of one module: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def set_fused_attention(model: nn.Module, fused: bool) -> int:
    """Choose the attention kernel of every timm ``Attention`` in ``model``: PyTorch's fused
    ``scaled_dot_product_attention`` (``fused=True``, timm's default) or timm's explicit
    ``softmax(q k^T * scale) v`` with batched matmuls. Same maths, different kernels: on the
    CPU, for the short sequences of small images (17-65 tokens), the explicit matmuls run the
    forward and backward in about half the time of the fused CPU kernel (docs/PERFORMANCE.md);
    on a GPU the fused kernels win. Returns how many modules were set."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = fused
            n += 1
    return n


def use_fused_attention(choice: str, device: torch.device) -> bool:
    """``choice``: "fused", "explicit" or "auto" (explicit on the CPU, fused elsewhere)."""
    if choice not in ("auto", "fused", "explicit"):
        raise ValueError(f"attention must be auto, fused or explicit, got {choice!r}")
    return choice == "fused" or (choice == "auto" and device.type != "cpu")


class ViTEncoder(nn.Module):
    """Plain ViT (cls token, fixed sin-cos pos-embed) with timm ``VisionTransformer`` names."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid)[None], requires_grad=False)
        dpr = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # also on meta
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=True,
                drop_path=dpr[i],
                norm_layer=LayerNorm,
            )
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)

    def init_weights(self) -> None:
        # MAE init: xavier-uniform Linear and flattened patch-embed, cls token N(0, 0.02)
        self.apply(init_module)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(
        self, imgs: Tensor, ids_keep: Tensor | None = None, final_norm: bool = True
    ) -> Tensor:
        """[N, 3, H, W] -> [N, 1 + K, D]; only the patches in ids_keep [N, K] if given."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [N, L, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}
