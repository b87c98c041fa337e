"""Python API for using pretrained encoders: ``enc = load_encoder(path); feats = enc(images)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cmae.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from cmae.data.views import normalize
from cmae.interop.encoders import at_img_size, build_vit_encoder, load_encoder_weights
from cmae.interop.export import safetensors_metadata
from cmae.interop.hf import WEIGHTS_NAME
from cmae.models.convvit import ConvViT
from cmae.models.vit import ViTEncoder
from cmae.runtime.checkpoint import CheckpointError

POOLS = ("cls", "mean", "tokens")


class Encoder(nn.Module):
    """A ViT (or hybrid ConvViT) encoder for feature extraction (eval mode; no masking, final
    norm on).

    ``forward(images, pool=None)``: images [N, 3, S, S], uint8 (normalised here with the
    pretraining mean/std) or float (already normalised). ``pool``: ``"cls"`` -> [N, D] cls token,
    ``"mean"`` -> [N, D] mean of the patch tokens, ``"tokens"`` -> [N, L, D] patch tokens.
    """

    def __init__(
        self,
        vit: ViTEncoder | ConvViT,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        _check_pool(pool)
        self.vit = vit
        self.pool = pool
        self.img_size = vit.img_size
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, images: Tensor, pool: str | None = None) -> Tensor:
        pool = pool or self.pool
        _check_pool(pool)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images (the position embedding's "
                f"size), got {images.shape[-2]}x{images.shape[-1]}; resize first, or load with "
                "load_encoder(..., img_size=N)"
            )
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
        x = self.vit(images)  # [N, 1 + L, D]
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        return x[:, 1:]


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def load_encoder(
    source: str | Path = "quick", pool: str = "cls", seed: int = 0, img_size: int | None = None
) -> Encoder:
    """A pretrained (or random) encoder in eval mode.

    ``source``: a ``cmae pretrain`` run directory or its checkpoint.pt, an imported checkpoint,
    an ``encoder.safetensors`` (timm names; a ConvViT's own names), a ``full`` export or a
    ``--format hf`` folder; anything else is taken as a preset name (``quick``, ``tiny``,
    ``vit_base``, ``convvit_tiny``, ...) and gives a randomly initialised encoder of that
    preset (seeded by ``seed``). ``img_size``: the input size to take (default: the size it
    was pretrained at); the position embedding is resampled bicubically for it, as timm does
    (``cmae.interop.encoders.at_img_size``).
    """
    path = Path(source).expanduser()
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    elif path.is_dir() and (path / WEIGHTS_NAME).is_file():
        path = path / WEIGHTS_NAME
    if not (path.suffix in (".pt", ".pth", ".safetensors") or path.is_file()):
        cfg = load_config(str(source))
        weights = load_encoder_weights("random", preset=str(source), seed=seed)
        mean, std = cfg.data.mean, cfg.data.std
    else:
        meta = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
        weights = load_encoder_weights(str(path))
        json_mean, json_std = _json_stats(meta)
        mean = weights.mean or json_mean or IMAGENET_MEAN
        std = weights.std or json_std or IMAGENET_STD
    weights = at_img_size(weights, img_size)
    return Encoder(build_vit_encoder(weights), mean, std, pool).eval()


def _json_stats(meta: dict[str, str]) -> tuple[tuple | None, tuple | None]:
    try:
        mean, std = meta.get("mean"), meta.get("std")
        return (
            tuple(json.loads(mean)) if mean else None,
            tuple(json.loads(std)) if std else None,
        )
    except json.JSONDecodeError as e:
        raise CheckpointError(f"bad mean/std metadata: {e}") from e
