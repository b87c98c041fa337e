"""The evaluation configs (``cmae knn / linprobe / finetune``): top-level keys of their own,
the same layering and error rules as the pretraining config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import (
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


class Pool(Choice):
    mean = "mean"  # the mean of the patch tokens
    cls = "cls"  # the cls token


class ProbeMode(Choice):
    # fast: cached features, no augmentation; full: MAE protocol, RandomResizedCrop + flip
    # images through the frozen encoder. Both train one head per blr in one pass.
    fast = "fast"
    full = "full"


class ProbeOptimizer(Choice):
    sgd = "sgd"  # momentum 0.9
    lars = "lars"  # the MAE protocol


class LrFrom(Choice):
    # where the lr is chosen: "val" = the best head on the held-out split it is reported on
    # (dinov2's practice); "train" = the best head on lr_holdout of train (stratified, seeded),
    # then that one lr retrained on all of train and scored once on the held-out split
    val = "val"
    train = "train"


@dataclass
class EvalEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built
    pool: Pool = Pool.mean  # features


@dataclass
class EvalDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT with train/ and val/ (or test/) class folders; None = built-in
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = bounded(None, "> 0")
    # eval view: resize to img_size / crop_pct, centre crop (0.875: 256->224)
    crop_pct: float = bounded(1.0, "(0, 1]")
    num_workers: int = bounded(4, ">= 0")
    # built-in generated data (used when path is None), as in the pretraining config
    synthetic_train: int = bounded(5000, "> 0")
    synthetic_val: int = bounded(1000, "> 0")
    synthetic_size: int = bounded(32, "> 0")
    synthetic_seed: int = 0
    synthetic_colors: Colors = Colors.grey


@dataclass
class KnnConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    k: int = bounded(20, "> 0")
    temperature: float = bounded(0.07, "> 0")
    batch_size: int = bounded(256, "> 0")  # feature extraction
    cache: bool = True  # keep the extracted features and reuse them on the next run
    cache_dir: str | None = None  # None = OUT/features
    device: str = checked("auto", device_name)
    seed: int = 0  # the random-init encoder
    out: str = "runs/knn"


@dataclass
class LinprobeConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    mode: ProbeMode = ProbeMode.fast
    optimizer: ProbeOptimizer = ProbeOptimizer.sgd
    # lr = blr * batch / 256
    blrs: tuple[float, ...] = bounded((1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), "> 0")
    lr_from: LrFrom = LrFrom.val
    lr_holdout: float = bounded(0.1, "(0, 1)")
    epochs: int = bounded(90, "> 0")
    warmup_epochs: int = bounded(10, ">= 0")
    batch_size: int = bounded(1024, ">= 2")  # BatchNorm needs at least 2 samples per batch
    cache: bool = True
    cache_dir: str | None = None
    device: str = checked("auto", device_name)
    seed: int = 0
    out: str = "runs/linprobe"


@dataclass
class FinetuneConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    epochs: int = bounded(100, "> 0")
    warmup_epochs: int = bounded(5, ">= 0")
    batch_size: int = bounded(1024, "> 0")
    blr: float = bounded(5e-4, "> 0")  # lr = blr * batch / 256 (2.5e-4 for 1600-epoch checkpoints)
    min_lr: float = bounded(1e-6, ">= 0")
    weight_decay: float = bounded(0.05, ">= 0")
    layer_decay: float = bounded(0.65, "(0, 1]")
    drop_path: float = bounded(0.1, "[0, 1)")
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = off
    reprob: float = bounded(0.25, "[0, 1]")  # random erasing
    mixup: float = bounded(0.8, ">= 0")  # alpha; 0 = off
    cutmix: float = bounded(1.0, ">= 0")  # alpha; 0 = off
    smoothing: float = bounded(0.1, "[0, 1)")
    # partial fine-tuning: last k blocks + head; None = all
    trainable_blocks: int | None = bounded(None, ">= 0")
    # epochs between evaluations on the held-out split; the last is always evaluated
    eval_every: int = bounded(1, "> 0")
    # epochs between checkpoints (OUT/checkpoints/); 0: only when a stop signal saves
    save_every: int = bounded(1, ">= 0")
    keep_last: int = bounded(2, ">= 1")  # periodic checkpoints kept
    # consecutive non-finite steps (each skipped) that stop the run
    max_bad_steps: int = bounded(20, ">= 1")
    # auto (the newest checkpoint in OUT) | never | a checkpoint path
    resume: str = checked("auto", resume_setting)
    # unreadable train images per epoch (substituted) before failing
    max_bad_fraction: float = bounded(0.01, "[0, 1]")
    device: str = checked("auto", device_name)
    seed: int = 0
    out: str = "runs/finetune"


EvalConfig = KnnConfig | LinprobeConfig | FinetuneConfig


def load_eval_config(
    cls: type[EvalConfig], path: str | None = None, overrides: list[str] | None = None
) -> EvalConfig:
    """Defaults of ``cls``, then a YAML file (e.g. a run's config.yaml), then the overrides."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = load_layered(cls, None if path is None else Path(path), overrides)
    validate_eval(cfg)
    return cfg


def validate_eval(cfg: EvalConfig) -> None:
    """The declared checks of every field, then the rules between fields; each error names its
    key."""
    check_fields(cfg)
    if cfg.encoder.checkpoint == "random":
        encoder_preset(cfg.encoder.preset)
    if isinstance(cfg, KnnConfig):
        return
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(
            f"warmup_epochs: {cfg.warmup_epochs} must not exceed epochs ({cfg.epochs})"
        )
    if isinstance(cfg, LinprobeConfig):
        if cfg.lr_from == "train" and cfg.mode != "fast":
            raise ConfigError("lr_from: 'train' needs mode=fast (the lr is chosen on features)")
        return
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size: mixup/cutmix need an even batch, got {cfg.batch_size}")


def encoder_preset(name: str) -> None:
    """ConfigError naming ``encoder.preset`` unless ``name`` is a pretraining preset or file."""
    try:
        preset_path(name)
    except ConfigError as e:
        raise ConfigError(f"encoder.preset: {e}") from None
