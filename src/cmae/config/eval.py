"""The evaluation configs (``cmae knn / linprobe / finetune``): top-level keys of their own,
the same layering and error rules as the pretraining config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cmae.config.base import ConfigError, SyntheticSplits, load_layered, preset_path


@dataclass
class EvalEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built
    pool: str = "mean"  # features: "mean" of the patch tokens or the "cls" token


@dataclass
class EvalDataConfig(SyntheticSplits):
    path: str | None = None  # ROOT with train/ and val/ (or test/) class folders; None = built-in
    # None: the pretraining checkpoint's data.mean/std, else ImageNet's
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float = 1.0  # eval view: resize to img_size / crop_pct, centre crop (0.875: 256->224)
    num_workers: int = 4
    # built-in generated data (used when path is None), as in the pretraining config
    synthetic_train: int = 5000
    synthetic_val: int = 1000
    synthetic_size: int = 32
    synthetic_seed: int = 0
    # as pretraining's data.synthetic_colors (the evaluation commands on the built-in data)
    synthetic_colors: str = "grey"


@dataclass
class KnnConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # feature extraction
    cache: bool = True  # keep the extracted features and reuse them on the next run
    cache_dir: str | None = None  # None = OUT/features
    device: str = "auto"
    seed: int = 0  # the random-init encoder
    out: str = "runs/knn"


@dataclass
class LinprobeConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    # fast: cached features, no augmentation; full: MAE protocol, RandomResizedCrop + flip
    # images through the frozen encoder. Both train one head per blr in one pass.
    mode: str = "fast"
    optimizer: str = "sgd"  # sgd (momentum 0.9) or lars (the MAE protocol)
    blrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # lr = blr * batch / 256
    # where the lr is chosen: "val" = the best head on the held-out split it is reported on
    # (dinov2's practice); "train" = the best head on lr_holdout of train (stratified, seeded),
    # then that one lr retrained on all of train and scored once on the held-out split
    lr_from: str = "val"
    lr_holdout: float = 0.1
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 1024
    cache: bool = True
    cache_dir: str | None = None
    device: str = "auto"
    seed: int = 0
    out: str = "runs/linprobe"


@dataclass
class FinetuneConfig:
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 1024
    blr: float = 5e-4  # lr = blr * batch / 256 (2.5e-4 for 1600-epoch checkpoints)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = off
    reprob: float = 0.25  # random erasing
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    smoothing: float = 0.1
    trainable_blocks: int | None = None  # partial fine-tuning: last k blocks + head; None = all
    eval_every: int = 1  # epochs between evaluations on the held-out split; the last is always
    save_every: int = 1  # epochs between checkpoints (OUT/checkpoints/); a stop signal saves too
    keep_last: int = 2  # periodic checkpoints kept
    max_bad_steps: int = 20  # consecutive non-finite steps (each skipped) that stop the run
    resume: str = "auto"  # auto (the newest checkpoint in OUT) | never | a checkpoint path
    max_bad_fraction: float = 0.01  # unreadable train images per epoch (substituted) before failing
    device: str = "auto"
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
    """Semantic checks of an evaluation config; each error names its key."""
    e, d = cfg.encoder, cfg.data
    if e.pool not in ("mean", "cls"):
        raise ConfigError(f"encoder.pool: expected 'mean' or 'cls', got {e.pool!r}")
    if e.checkpoint == "random":
        preset_path(e.preset)  # fails early, naming the preset
    if not 0 < d.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct: must be in (0, 1], got {d.crop_pct}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: must be positive, got {d.std}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    d.check_synthetic()
    if cfg.batch_size <= 0:
        raise ConfigError(f"batch_size: must be positive, got {cfg.batch_size}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if isinstance(cfg, KnnConfig):
        if cfg.k <= 0:
            raise ConfigError(f"k: must be positive, got {cfg.k}")
        if cfg.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {cfg.temperature}")
        return
    if cfg.epochs <= 0:
        raise ConfigError(f"epochs: must be positive, got {cfg.epochs}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ConfigError(f"warmup_epochs: must be in [0, epochs], got {cfg.warmup_epochs}")
    if isinstance(cfg, LinprobeConfig):
        if cfg.mode not in ("fast", "full"):
            raise ConfigError(f"mode: expected 'fast' or 'full', got {cfg.mode!r}")
        if cfg.optimizer not in ("sgd", "lars"):
            raise ConfigError(f"optimizer: expected 'sgd' or 'lars', got {cfg.optimizer!r}")
        if not cfg.blrs or any(lr <= 0 for lr in cfg.blrs):
            raise ConfigError(f"blrs: must all be positive, got {cfg.blrs}")
        if cfg.batch_size < 2:
            raise ConfigError("batch_size: BatchNorm needs at least 2 samples per batch")
        if cfg.lr_from not in ("val", "train"):
            raise ConfigError(f"lr_from: expected 'val' or 'train', got {cfg.lr_from!r}")
        if cfg.lr_from == "train" and cfg.mode != "fast":
            raise ConfigError("lr_from: 'train' needs mode=fast (the lr is chosen on features)")
        if not 0 < cfg.lr_holdout < 1:
            raise ConfigError(f"lr_holdout: must be in (0, 1), got {cfg.lr_holdout}")
        return
    if cfg.blr <= 0 or cfg.min_lr < 0:
        raise ConfigError(f"blr / min_lr: need blr > 0, min_lr >= 0; got {cfg.blr}, {cfg.min_lr}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay: must be >= 0, got {cfg.weight_decay}")
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay: must be in (0, 1], got {cfg.layer_decay}")
    if not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"drop_path: must be in [0, 1), got {cfg.drop_path}")
    if not 0 <= cfg.reprob <= 1:
        raise ConfigError(f"reprob: probability must be in [0, 1], got {cfg.reprob}")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise ConfigError(f"mixup / cutmix: alphas must be >= 0, got {cfg.mixup}, {cfg.cutmix}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size: mixup/cutmix need an even batch, got {cfg.batch_size}")
    if not 0 <= cfg.smoothing < 1:
        raise ConfigError(f"smoothing: must be in [0, 1), got {cfg.smoothing}")
    if cfg.trainable_blocks is not None and cfg.trainable_blocks < 0:
        raise ConfigError(f"trainable_blocks: must be >= 0, got {cfg.trainable_blocks}")
    if cfg.eval_every <= 0:
        raise ConfigError(f"eval_every: must be positive (epochs), got {cfg.eval_every}")
    if cfg.save_every < 0:
        raise ConfigError(
            f"save_every: must be >= 0 (epochs; 0 = on a stop only), got {cfg.save_every}"
        )
    if not cfg.resume:
        raise ConfigError("resume: expected auto, never or a checkpoint path, got ''")
    if cfg.keep_last < 1:
        raise ConfigError(f"keep_last: must be >= 1, got {cfg.keep_last}")
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps: must be >= 1, got {cfg.max_bad_steps}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction: must be in [0, 1], got {cfg.max_bad_fraction}")
