"""The ``cmae segment`` config: semantic segmentation with UperNet. The defaults are the
offline setting (the generated data, a few minutes on 2 CPU cores); the presets in
cmae/configs/segment/ are ``ade20k_vit_base`` (the reference recipe: MAE / CMAE ADE20K,
mmsegmentation's mae-base_upernet 160k) and ``camvid_cpu``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import (
    PRESET_DIR,
    Choice,
    Colors,
    ConfigError,
    SyntheticSplits,
    bounded,
    check_fields,
    checked,
    device_name,
    load_layered,
    preset_path,
    resume_setting,
)
from cmae.config.eval import encoder_preset

SEGMENT_PRESET_DIR = PRESET_DIR / "segment"


class SegAmp(Choice):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    none = "none"


@dataclass
class SegEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built


@dataclass
class SegDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT in the ADE20K layout; None = built-in generated data
    # None: ROOT/classes.txt (the generated data: 4)
    num_classes: int | None = bounded(None, "[1, 255]")
    reduce_zero_label: bool = True  # label 0 ignored, k -> k - 1 (ADE20K); not for generated
    # (long, short) side limits; reference (2048, 512)
    scale: tuple[int, int] = bounded((256, 64), "> 0")
    # training rescale ratio; reference 0.5-2.0
    ratio_range: tuple[float, float] = bounded((0.75, 1.5), "> 0", ordered=True)
    crop: int = bounded(64, "> 0")  # training crop and sliding window; reference 512
    stride: int = bounded(43, "> 0")  # sliding-window stride; reference 341
    cat_max_ratio: float = bounded(0.75, "(0, 1]")
    hflip: float = bounded(0.5, "[0, 1]")
    photometric: bool = True
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = bounded(None, "> 0")
    num_workers: int = bounded(1, ">= 0")
    vis_images: int = bounded(4, ">= 0")  # validation images in OUT/predictions.png (0: none)
    # built-in generated data (used when path is None)
    synthetic_train: int = bounded(400, "> 0")
    synthetic_val: int = bounded(50, "> 0")
    synthetic_size: int = bounded(64, "> 0")
    synthetic_seed: int = 0
    # the generated scenes (cmae.data.dense_shapes): color (default) or grey (the same scenes
    # in grey levels: the shapes no longer stand out by their colour)
    synthetic_colors: Colors = Colors.color


@dataclass
class SegModelConfig:
    channels: int = bounded(32, "> 0")  # UperNet width; reference 768
    # FCN auxiliary head width (0: no auxiliary head); reference 256
    aux_channels: int = bounded(16, ">= 0")
    aux_weight: float = bounded(0.4, ">= 0")
    pool_scales: tuple[int, ...] = bounded((1, 2, 3, 6), "> 0")
    dropout: float = bounded(0.1, "[0, 1)")
    drop_path: float = bounded(0.1, "[0, 1)")
    # None: 4 evenly spaced blocks (ViT-B 3,5,7,11)
    out_indices: tuple[int, int, int, int] | None = None
    rel_pos_bias: bool = False  # relative position bias per block, initialised to zero
    # layer-scale init value (the MAE backbone: 1.0); None: off
    layer_scale: float | None = bounded(None, "> 0")
    # cross-entropy averaged over the labelled pixels (PyTorch's); false: over all pixels
    # (mmsegmentation's default, avg_non_ignore=False)
    avg_non_ignore: bool = True


@dataclass
class SegmentConfig:
    encoder: SegEncoderConfig = field(default_factory=SegEncoderConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    iters: int = bounded(400, "> 0")  # reference 160,000
    # stop after this many (the schedule still spans iters)
    max_iters: int | None = bounded(None, "> 0")
    # linear warmup from lr x 1e-6; reference 1,500
    warmup_iters: int = bounded(30, ">= 0")
    batch_size: int = bounded(8, "> 0")  # the GLOBAL batch; reference 16
    lr: float = bounded(2e-3, "> 0")  # reference 1e-4 (for 160k iterations)
    weight_decay: float = bounded(0.05, ">= 0")
    betas: tuple[float, float] = bounded((0.9, 0.999), "[0, 1)")
    layer_decay: float = bounded(0.65, "(0, 1]")
    power: float = bounded(1.0, "> 0")  # poly decay to min_lr after the warmup
    min_lr: float = bounded(0.0, ">= 0")
    # iterations; the last one is always evaluated (0: only it); reference 16,000
    eval_every: int = bounded(50, ">= 0")
    log_every: int = bounded(10, ">= 1")
    amp: SegAmp = SegAmp.auto
    threads: int | None = bounded(None, "> 0")
    # checkpoints in OUT/checkpoints/ every save_every iterations (0: none) and at the end
    resume: str = checked("auto", resume_setting)  # auto | never | a checkpoint path
    save_every: int = bounded(100, ">= 0")
    keep_last: int = bounded(2, ">= 1")
    # consecutive non-finite steps (each skipped) that stop the run
    max_bad_steps: int = bounded(20, ">= 1")
    device: str = checked("auto", device_name)
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
    """The declared checks of every field, then the rules between fields; each error names its
    key."""
    check_fields(cfg)
    if cfg.encoder.checkpoint == "random":
        encoder_preset(cfg.encoder.preset)
    if cfg.data.stride > cfg.data.crop:
        raise ConfigError(
            f"data.stride: {cfg.data.stride} must not exceed data.crop ({cfg.data.crop})"
        )
    if cfg.warmup_iters > cfg.iters:
        raise ConfigError(f"warmup_iters: {cfg.warmup_iters} must not exceed iters ({cfg.iters})")
