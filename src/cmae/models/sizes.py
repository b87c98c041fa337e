"""The encoder sizes by name, in a leaf module (no torch): the config checks names against them,
the models build from them."""

from __future__ import annotations

import re

# name -> (embed_dim, depth, num_heads)
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_micro": (128, 6, 4),  # CPU quick-start size, not a paper model
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}

# any other plain ViT: "vit_{width}x{depth}h{heads}", e.g. vit_192x4h3 (what an imported
# official checkpoint of a non-preset size is called)
CUSTOM_VIT = re.compile(r"vit_(\d+)x(\d+)h(\d+)$")


def vit_size(name: str) -> tuple[int, int, int] | None:
    """(width, depth, heads) of a ViT size name (a preset or ``vit_{W}x{D}h{H}``); None for a
    name that is neither (e.g. a ConvViT). A custom size that cannot be built is a ValueError."""
    if name in ENCODER_SIZES:
        return ENCODER_SIZES[name]
    m = CUSTOM_VIT.match(name)
    if m is None:
        return None
    dim, depth, heads = map(int, m.groups())
    if min(dim, depth, heads) <= 0 or dim % heads or dim % 4:
        raise ValueError(
            f"{name}: width must be a multiple of the heads and of 4 (sin-cos position "
            "embedding), all positive"
        )
    return dim, depth, heads


def vit_name(dim: int, depth: int, heads: int) -> str:
    """The preset name of a ViT shape, else its ``vit_{W}x{D}h{H}`` name."""
    preset = next((n for n, size in ENCODER_SIZES.items() if size == (dim, depth, heads)), None)
    return preset or f"vit_{dim}x{depth}h{heads}"


# name -> (stage dims, stage depths, stage-3 heads); ConvMAE-Base is 256/384/768, 2/2/11, 12.
# The smaller sizes keep its 1/3 : 1/2 : 1 width ratio at ViT-Tiny / ViT-Small stage-3 widths.
CONVVIT_SIZES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], int]] = {
    "convvit_tiny": ((64, 96, 192), (2, 2, 11), 3),  # CPU size for 32 px images
    "convvit_small": ((128, 192, 384), (2, 2, 11), 6),
    "convvit_base": ((256, 384, 768), (2, 2, 11), 12),
}
