"""The ``cmae detect`` config: object detection and instance segmentation with ViTDet's Mask
R-CNN. The defaults are the offline setting (the generated instances, a few minutes on 2 CPU
cores); the presets in cmae/configs/detect/ are ``coco_vit_base`` (the reference recipe:
ViTDet ViT-B Mask R-CNN, 100 epochs of COCO) and ``pennfudan_cpu``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import PRESET_DIR, SyntheticSplits, load_layered, preset_path
from cmae.errors import ConfigError

DETECT_PRESET_DIR = PRESET_DIR / "detect"


@dataclass
class DetEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built


@dataclass
class DetDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT in the COCO layout; None = built-in generated data
    size: int = 64  # training crop and test long side, inputs padded square; reference 1024
    scale_range: tuple[float, float] = (0.5, 1.5)  # large-scale jitter; reference (0.1, 2.0)
    hflip: float = 0.5
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # images (and, separately, annotations) that may be bad and are then left out and counted
    max_bad_fraction: float = 0.0
    num_workers: int = 1
    vis_images: int = 4  # validation images in OUT/predictions.png (0: none)
    # built-in generated data (used when path is None)
    synthetic_train: int = 400
    synthetic_val: int = 50
    synthetic_size: int = 64
    synthetic_seed: int = 0
    synthetic_colors: str = "color"  # the shapes' colours: color (default) or grey


@dataclass
class DetModelConfig:
    # window attention in all blocks but the global ones; window side in tokens (None: ViTDet's
    # 14 tokens at 1024 px and patch 16, scaled to this run's token grid)
    window_size: int | None = None
    global_blocks: tuple[int, ...] | None = None  # None: 4 evenly spaced (ViT-B: 2, 5, 8, 11)
    rel_pos_bias: bool = True  # decomposed relative position embeddings, zero init (ViTDet)
    drop_path: float = 0.1
    channels: int = 32  # feature pyramid and head width; reference 256
    # anchor side per pyramid level P2..P6 (None: ViTDet's 32, 64, 128, 256, 512)
    anchor_sizes: tuple[int, ...] | None = None
    rois_per_image: int = 32  # sampled RoIs per training image for the box head; reference 512
    proposals: int = 100  # RPN proposals kept per image after NMS (train and test); ref. 1000
    detections_per_image: int = 20  # reference 100


@dataclass
class DetectConfig:
    encoder: DetEncoderConfig = field(default_factory=DetEncoderConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    iters: int = 300  # reference 184,375
    max_iters: int | None = None  # stop after this many (the schedule still spans iters)
    warmup_iters: int = 20  # linear warmup from lr x warmup_factor; reference 250
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = ()  # lr x lr_gamma at each; reference (163,889, 177,546)
    lr_gamma: float = 0.1
    batch_size: int = 4  # the GLOBAL batch; reference 64
    lr: float = 1e-3  # reference 1e-4 at batch 64
    weight_decay: float = 0.1  # none on norms, biases, position embeddings
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.7
    eval_every: int = 50  # iterations; the last one is always evaluated
    log_every: int = 10
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | none
    threads: int | None = None
    # checkpoints in OUT/checkpoints/ every save_every iterations (0: none) and at the end
    resume: str = "auto"  # auto | never | a checkpoint path
    save_every: int = 100
    keep_last: int = 2
    max_bad_steps: int = 20  # consecutive non-finite steps (each skipped) that stop the run
    device: str = "auto"
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
    """Semantic checks of a detect config; each error names its key."""
    d, m = cfg.data, cfg.model
    if cfg.encoder.checkpoint == "random":
        preset_path(cfg.encoder.preset)
    if d.size <= 0:
        raise ConfigError(f"data.size: must be positive, got {d.size}")
    if not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"data.scale_range: need 0 < lo <= hi, got {d.scale_range}")
    if not 0 <= d.hflip <= 1:
        raise ConfigError(f"data.hflip: probability must be in [0, 1], got {d.hflip}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: must be positive, got {d.std}")
    if not 0 <= d.max_bad_fraction < 1:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1), got {d.max_bad_fraction}")
    for key in ("num_workers", "vis_images"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {getattr(d, key)}")
    d.check_synthetic()
    if d.synthetic_size < 16:
        raise ConfigError(f"data.synthetic_size: must be >= 16, got {d.synthetic_size}")
    if m.window_size is not None and m.window_size <= 0:
        raise ConfigError(f"model.window_size: must be positive (or null), got {m.window_size}")
    if m.global_blocks is not None and any(b < 0 for b in m.global_blocks):
        raise ConfigError(f"model.global_blocks: block indices >= 0, got {m.global_blocks}")
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {m.drop_path}")
    if m.anchor_sizes is not None and (
        len(m.anchor_sizes) != 5 or any(a <= 0 for a in m.anchor_sizes)
    ):
        raise ConfigError(f"model.anchor_sizes: 5 positive sides (P2..P6), got {m.anchor_sizes}")
    for key in ("channels", "rois_per_image", "proposals", "detections_per_image"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}: must be positive, got {getattr(m, key)}")
    if cfg.iters <= 0 or not 0 <= cfg.warmup_iters <= cfg.iters:
        raise ConfigError(
            f"iters / warmup_iters: need iters > 0 and 0 <= warmup_iters <= iters, got "
            f"{cfg.iters}, {cfg.warmup_iters}"
        )
    if not 0 < cfg.warmup_factor <= 1:
        raise ConfigError(f"warmup_factor: must be in (0, 1], got {cfg.warmup_factor}")
    if list(cfg.lr_steps) != sorted(cfg.lr_steps) or any(s <= 0 for s in cfg.lr_steps):
        raise ConfigError(f"lr_steps: increasing positive iterations, got {cfg.lr_steps}")
    if not 0 < cfg.lr_gamma <= 1:
        raise ConfigError(f"lr_gamma: must be in (0, 1], got {cfg.lr_gamma}")
    if cfg.max_iters is not None and cfg.max_iters <= 0:
        raise ConfigError(f"max_iters: must be positive, got {cfg.max_iters}")
    if cfg.batch_size <= 0:
        raise ConfigError(f"batch_size: must be positive, got {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.weight_decay < 0:
        raise ConfigError("lr: must be > 0; weight_decay: >= 0")
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay: must be in (0, 1], got {cfg.layer_decay}")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"betas: each must be in [0, 1), got {cfg.betas}")
    for key in ("eval_every", "save_every"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0 (0 = off), got {getattr(cfg, key)}")
    if cfg.log_every <= 0 or cfg.keep_last < 1:
        raise ConfigError("log_every / keep_last: must be >= 1")
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps: must be >= 1, got {cfg.max_bad_steps}")
    if cfg.amp not in ("auto", "bf16", "none"):
        raise ConfigError(f"amp: expected auto, bf16 or none, got {cfg.amp!r}")
    if cfg.threads is not None and cfg.threads <= 0:
        raise ConfigError(f"threads: must be positive, got {cfg.threads}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not cfg.resume:
        raise ConfigError("resume: expected auto, never or a checkpoint path, got ''")
