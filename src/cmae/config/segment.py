"""The ``cmae segment`` config: semantic segmentation with UperNet. The defaults are the
offline setting (the generated data, a few minutes on 2 CPU cores); the presets in
cmae/configs/segment/ are ``ade20k_vit_base`` (the reference recipe: MAE / CMAE ADE20K,
mmsegmentation's mae-base_upernet 160k) and ``camvid_cpu``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import (
    PRESET_DIR,
    ConfigError,
    SyntheticSplits,
    load_layered,
    preset_path,
)

SEGMENT_PRESET_DIR = PRESET_DIR / "segment"


@dataclass
class SegEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built


@dataclass
class SegDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT in the ADE20K layout; None = built-in generated data
    num_classes: int | None = None  # None: ROOT/classes.txt (the generated data: 4)
    reduce_zero_label: bool = True  # label 0 ignored, k -> k - 1 (ADE20K); not for generated
    scale: tuple[int, int] = (256, 64)  # (long, short) side limits; reference (2048, 512)
    ratio_range: tuple[float, float] = (0.75, 1.5)  # training rescale ratio; reference 0.5-2.0
    crop: int = 64  # training crop and sliding window; reference 512
    stride: int = 43  # sliding-window stride; reference 341
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    num_workers: int = 1
    vis_images: int = 4  # validation images in OUT/predictions.png (0: none)
    # built-in generated data (used when path is None)
    synthetic_train: int = 400
    synthetic_val: int = 50
    synthetic_size: int = 64
    synthetic_seed: int = 0
    # the generated scenes (cmae.data.dense_shapes): color (default) or grey (the same scenes
    # in grey levels: the shapes no longer stand out by their colour)
    synthetic_colors: str = "color"


@dataclass
class SegModelConfig:
    channels: int = 32  # UperNet width; reference 768
    aux_channels: int = 16  # FCN auxiliary head width (0: no auxiliary head); reference 256
    aux_weight: float = 0.4
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    drop_path: float = 0.1
    out_indices: tuple[int, ...] | None = None  # None: 4 evenly spaced blocks (ViT-B 3,5,7,11)
    rel_pos_bias: bool = False  # relative position bias per block, initialised to zero
    layer_scale: float | None = None  # layer-scale init value (the MAE backbone: 1.0); None: off
    # cross-entropy averaged over the labelled pixels (PyTorch's); false: over all pixels
    # (mmsegmentation's default, avg_non_ignore=False)
    avg_non_ignore: bool = True


@dataclass
class SegmentConfig:
    encoder: SegEncoderConfig = field(default_factory=SegEncoderConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    iters: int = 400  # reference 160,000
    max_iters: int | None = None  # stop after this many (the schedule still spans iters)
    warmup_iters: int = 30  # linear warmup from lr x 1e-6; reference 1,500
    batch_size: int = 8  # the GLOBAL batch; reference 16
    lr: float = 2e-3  # reference 1e-4 (for 160k iterations)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65
    power: float = 1.0  # poly decay to min_lr after the warmup
    min_lr: float = 0.0
    eval_every: int = 50  # iterations; the last one is always evaluated; reference 16,000
    log_every: int = 10
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | none
    threads: int | None = None
    # checkpoints in OUT/checkpoints/ every save_every iterations (0: none) and at the end
    resume: str = "auto"  # auto | never | a checkpoint path
    save_every: int = 100
    keep_last: int = 2
    device: str = "auto"
    seed: int = 0
    out: str = "runs/segment"


def segment_preset_path(name_or_path: str) -> Path:
    """A preset of configs/segment/ (``ade20k_vit_base``, ``camvid_cpu``) or a YAML file."""
    return preset_path(name_or_path, SEGMENT_PRESET_DIR, "segment ")


def load_segment_config(
    preset: str | None = None, overrides: list[str] | None = None
) -> SegmentConfig:
    """Defaults, then a preset / YAML file (e.g. a run's config.yaml), then the overrides."""
    path = None if preset is None else segment_preset_path(preset)
    cfg = load_layered(SegmentConfig, path, overrides)
    validate_segment(cfg)
    return cfg


def validate_segment(cfg: SegmentConfig) -> None:
    """Semantic checks of a segment config; each error names its key."""
    d, m = cfg.data, cfg.model
    if cfg.encoder.checkpoint == "random":
        preset_path(cfg.encoder.preset)
    if d.num_classes is not None and not 1 <= d.num_classes <= 255:
        raise ConfigError(f"data.num_classes: must be in 1..255, got {d.num_classes}")
    if min(d.scale) <= 0 or not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        raise ConfigError(
            f"data.scale / data.ratio_range: need positive sides and 0 < lo <= hi, got "
            f"{d.scale}, {d.ratio_range}"
        )
    if d.crop <= 0 or not 0 < d.stride <= d.crop:
        raise ConfigError(f"data.stride: must be in (0, data.crop={d.crop}], got {d.stride}")
    if not 0 < d.cat_max_ratio <= 1:
        raise ConfigError(f"data.cat_max_ratio: must be in (0, 1], got {d.cat_max_ratio}")
    if not 0 <= d.hflip <= 1:
        raise ConfigError(f"data.hflip: probability must be in [0, 1], got {d.hflip}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: must be positive, got {d.std}")
    for key in ("num_workers", "vis_images"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {getattr(d, key)}")
    d.check_synthetic()
    if m.channels <= 0 or m.aux_channels < 0 or m.aux_weight < 0:
        raise ConfigError("model.channels / aux_channels / aux_weight: must be positive / >= 0")
    if not m.pool_scales or any(s <= 0 for s in m.pool_scales):
        raise ConfigError(f"model.pool_scales: must be positive, got {m.pool_scales}")
    if m.out_indices is not None and len(m.out_indices) != 4:
        raise ConfigError(f"model.out_indices: 4 block indices, got {m.out_indices}")
    for key in ("dropout", "drop_path"):
        if not 0 <= getattr(m, key) < 1:
            raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(m, key)}")
    if m.layer_scale is not None and m.layer_scale <= 0:
        raise ConfigError(f"model.layer_scale: must be positive (or null), got {m.layer_scale}")
    if cfg.iters <= 0 or not 0 <= cfg.warmup_iters <= cfg.iters:
        raise ConfigError(
            f"iters / warmup_iters: need iters > 0 and 0 <= warmup_iters <= iters, got "
            f"{cfg.iters}, {cfg.warmup_iters}"
        )
    if cfg.max_iters is not None and cfg.max_iters <= 0:
        raise ConfigError(f"max_iters: must be positive, got {cfg.max_iters}")
    if cfg.batch_size <= 0:
        raise ConfigError(f"batch_size: must be positive, got {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.weight_decay < 0 or cfg.power <= 0:
        raise ConfigError("lr / power: must be > 0; min_lr / weight_decay: >= 0")
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay: must be in (0, 1], got {cfg.layer_decay}")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"betas: each must be in [0, 1), got {cfg.betas}")
    for key in ("eval_every", "save_every"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0 (0 = off), got {getattr(cfg, key)}")
    if cfg.log_every <= 0 or cfg.keep_last < 1:
        raise ConfigError("log_every / keep_last: must be >= 1")
    if cfg.amp not in ("auto", "bf16", "none"):
        raise ConfigError(f"amp: expected auto, bf16 or none, got {cfg.amp!r}")
    if cfg.threads is not None and cfg.threads <= 0:
        raise ConfigError(f"threads: must be positive, got {cfg.threads}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not cfg.resume:
        raise ConfigError("resume: expected auto, never or a checkpoint path, got ''")
