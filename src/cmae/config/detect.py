"""The ``cmae detect`` config: object detection and instance segmentation with ViTDet's Mask
R-CNN. The defaults are the offline setting (the generated instances, a few minutes on 2 CPU
cores); the presets in cmae/configs/detect/ are ``coco_vit_base`` (the reference recipe:
ViTDet ViT-B Mask R-CNN, 100 epochs of COCO) and ``pennfudan_cpu``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import (
    PRESET_DIR,
    Choice,
    Colors,
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
from cmae.errors import ConfigError

DETECT_PRESET_DIR = PRESET_DIR / "detect"


class DetAmp(Choice):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    none = "none"


def five_anchor_sides(sizes: tuple[int, ...]) -> None:
    if len(sizes) != 5 or any(a <= 0 for a in sizes):
        raise ValueError(f"5 positive sides (P2..P6), got {list(sizes)}")


def increasing_steps(steps: tuple[int, ...]) -> None:
    if list(steps) != sorted(steps) or any(s <= 0 for s in steps):
        raise ValueError(f"increasing positive iterations, got {list(steps)}")


@dataclass
class DetEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built


@dataclass
class DetDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT in the COCO layout; None = built-in generated data
    # training crop and test long side, inputs padded square; reference 1024
    size: int = bounded(64, "> 0")
    # large-scale jitter; reference (0.1, 2.0)
    scale_range: tuple[float, float] = bounded((0.5, 1.5), "> 0", ordered=True)
    hflip: float = bounded(0.5, "[0, 1]")
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = bounded(None, "> 0")
    # images (and, separately, annotations) that may be bad and are then left out and counted
    max_bad_fraction: float = bounded(0.0, "[0, 1)")
    num_workers: int = bounded(1, ">= 0")
    vis_images: int = bounded(4, ">= 0")  # validation images in OUT/predictions.png (0: none)
    # built-in generated data (used when path is None)
    synthetic_train: int = bounded(400, "> 0")
    synthetic_val: int = bounded(50, "> 0")
    synthetic_size: int = bounded(64, ">= 16")
    synthetic_seed: int = 0
    synthetic_colors: Colors = Colors.color  # the shapes' colours: color (default) or grey


@dataclass
class DetModelConfig:
    # window attention in all blocks but the global ones; window side in tokens (None: ViTDet's
    # 14 tokens at 1024 px and patch 16, scaled to this run's token grid)
    window_size: int | None = bounded(None, "> 0")
    # None: 4 evenly spaced (ViT-B: 2, 5, 8, 11)
    global_blocks: tuple[int, ...] | None = bounded(None, ">= 0")
    rel_pos_bias: bool = True  # decomposed relative position embeddings, zero init (ViTDet)
    drop_path: float = bounded(0.1, "[0, 1)")
    channels: int = bounded(32, "> 0")  # feature pyramid and head width; reference 256
    # anchor side per pyramid level P2..P6 (None: ViTDet's 32, 64, 128, 256, 512)
    anchor_sizes: tuple[int, ...] | None = checked(None, five_anchor_sides)
    # sampled RoIs per training image for the box head; reference 512
    rois_per_image: int = bounded(32, "> 0")
    # RPN proposals kept per image after NMS (train and test); reference 1000
    proposals: int = bounded(100, "> 0")
    detections_per_image: int = bounded(20, "> 0")  # reference 100


@dataclass
class DetectConfig:
    encoder: DetEncoderConfig = field(default_factory=DetEncoderConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    iters: int = bounded(300, "> 0")  # reference 184,375
    # stop after this many (the schedule still spans iters)
    max_iters: int | None = bounded(None, "> 0")
    # linear warmup from lr x warmup_factor; reference 250
    warmup_iters: int = bounded(20, ">= 0")
    warmup_factor: float = bounded(0.001, "(0, 1]")
    # lr x lr_gamma at each; reference (163,889, 177,546)
    lr_steps: tuple[int, ...] = checked((), increasing_steps)
    lr_gamma: float = bounded(0.1, "(0, 1]")
    batch_size: int = bounded(4, "> 0")  # the GLOBAL batch; reference 64
    lr: float = bounded(1e-3, "> 0")  # reference 1e-4 at batch 64
    # none on norms, biases, position embeddings
    weight_decay: float = bounded(0.1, ">= 0")
    betas: tuple[float, float] = bounded((0.9, 0.999), "[0, 1)")
    layer_decay: float = bounded(0.7, "(0, 1]")
    # iterations; the last one is always evaluated
    eval_every: int = bounded(50, ">= 0")
    log_every: int = bounded(10, ">= 1")
    amp: DetAmp = DetAmp.auto
    threads: int | None = bounded(None, "> 0")
    # checkpoints in OUT/checkpoints/ every save_every iterations (0: none) and at the end
    resume: str = checked("auto", resume_setting)  # auto | never | a checkpoint path
    save_every: int = bounded(100, ">= 0")
    keep_last: int = bounded(2, ">= 1")
    # consecutive non-finite steps (each skipped) that stop the run
    max_bad_steps: int = bounded(20, ">= 1")
    device: str = checked("auto", device_name)
    seed: int = 0
    out: str = "runs/detect"


def detect_preset_path(name_or_path: str) -> Path:
    """A preset of configs/detect/ (``coco_vit_base``, ``pennfudan_cpu``) or a YAML file."""
    return preset_path(name_or_path, DETECT_PRESET_DIR, "detect ")


def load_detect_config(
    preset: str | None = None, overrides: list[str] | None = None
) -> DetectConfig:
    """Defaults, then a preset / YAML file (e.g. a run's config.yaml), then the overrides."""
    path = None if preset is None else detect_preset_path(preset)
    cfg = load_layered(DetectConfig, path, overrides)
    validate_detect(cfg)
    return cfg


def validate_detect(cfg: DetectConfig) -> None:
    """The declared checks of every field, then the rules between fields; each error names its
    key."""
    check_fields(cfg)
    if cfg.encoder.checkpoint == "random":
        encoder_preset(cfg.encoder.preset)
    if cfg.warmup_iters > cfg.iters:
        raise ConfigError(f"warmup_iters: {cfg.warmup_iters} must not exceed iters ({cfg.iters})")
