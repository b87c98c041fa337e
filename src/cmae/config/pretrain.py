"""The pretraining config (``cmae pretrain``): model, data and train sections.

The dataclass defaults are the reference ViT-B/16 recipe of the CMAE paper (CMAE_SPEC.md); the
``tiny`` preset (the default of ``cmae pretrain``) is the small CPU setting for 32 px images.
Unknown keys and values of the wrong type are errors that name the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cmae.config.base import ConfigError, SyntheticSplits, compose, load_layered, preset_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    method: str = "cmae"  # "cmae" (contrastive + reconstruction) or "mae" (reconstruction only)
    # a key of models.vit.ENCODER_SIZES or models.convvit.CONVVIT_SIZES, or vit_{W}x{D}h{H}
    encoder: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    drop_path: float = 0.0
    # None picks the method's reference value: cmae 0.65 with 2x2 blocks, mae 0.75 per patch
    mask_ratio: float | None = None
    mask_block: int | None = None
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    feature_decoder: bool = True  # off: pool the encoder's visible tokens instead
    feature_decoder_depth: int = 2
    proj_hidden_dim: int = 1536
    proj_dim: int = 256
    norm_pix_loss: bool = True
    temperature: float = 0.07
    pixel_weight: float = 1.0
    contrast_weight: float = 1.0
    target_masked: bool = (
        False  # ablation: the target encoder sees only the online mask's visible patches
    )
    symmetric: bool = False  # ablation: add the swapped (target-view query, online-view key) term

    def resolved_mask(self) -> tuple[float, int]:
        ratio = self.mask_ratio if self.mask_ratio is not None else REFERENCE_MASK[self.method][0]
        block = self.mask_block if self.mask_block is not None else REFERENCE_MASK[self.method][1]
        return ratio, block


REFERENCE_MASK = {"cmae": (0.65, 2), "mae": (0.75, 1)}


@dataclass
class DataConfig(SyntheticSplits):
    path: str | None = None  # ImageFolder-style dir; None = built-in generated shapes
    max_shift: int = 32  # pixels; master crop is img_size + max_shift, offsets in [0, max_shift)
    # MAE only: its view is the online view of CMAE's crop (the (0, 0) window of an
    # img_size + max_shift crop) instead of its own RandomResizedCrop to img_size
    mae_same_crop: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    target_color_aug: bool = True
    # the target's colour ops on the training device, batched (views.DeviceTargetColor): the
    # data workers only decode and crop; same ops and parameter distributions
    target_aug_device: bool = False
    # also the random resized crop's resize, flip and shift windows on the training device
    # (views.CropBoxes / DeviceViews): the workers only decode and cut out the crop box. For
    # GPUs starved by the CPU; on the CPU it moves work from the workers to the main process
    resize_device: bool = False
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 8
    # built-in generated data (used when path is None)
    synthetic_train: int = 5000
    synthetic_val: int = 1000
    synthetic_size: int = 32
    synthetic_seed: int = 0
    # the generated shapes' colours: grey (default: random grey levels) or color (random RGB,
    # the built-in data before 2026-11-30); see cmae.data.datasets.SyntheticShapes
    synthetic_colors: str = "grey"
    # kNN check at the end of pretraining on labelled data
    knn_bank: int = 10000  # at most this many labelled train images in the feature bank
    knn_queries: int = 2000  # at most this many held-out images queried
    # unreadable images are replaced and counted (log.jsonl: bad_images); more than this
    # fraction of an epoch is an error
    max_bad_fraction: float = 0.01


@dataclass
class TrainConfig:
    epochs: int = 1600
    warmup_epochs: float = 40  # fractions allowed: 0.2 = a fifth of an epoch
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke tests)
    batch_size: int = 4096  # the GLOBAL batch: split over the ranks and the accum_steps
    blr: float = 1.5e-4  # lr = blr * batch_size / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    # "reference": the official CMAE exemptions (biases, LayerNorms, tokens, pos-embeds; BN
    # weights decayed); "1d": every 1-D parameter exempt (MAE's rule, cmae before 2026-11-30)
    wd_exempt: str = "reference"
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.996
    momentum_end: float = 0.996  # != momentum: cosine ramp from momentum to momentum_end
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads on CPU; None = torch default
    amp: str = "auto"  # autocast: auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none
    compile: bool = False  # torch.compile the training forward/backward
    # attention kernel: fused (PyTorch's scaled_dot_product_attention), explicit (batched
    # matmuls + softmax, same maths) or auto: explicit on the CPU, where it is faster for the
    # short sequences of small images, fused elsewhere (docs/PERFORMANCE.md)
    attention: str = "auto"
    # micro-batches per optimizer step; all micro-batches are contrasted with the keys of the
    # whole step's batch, so only BatchNorm statistics differ from one large batch
    accum_steps: int = 1
    log_every: int = 20
    out: str = "runs/cmae"
    knn_k: int = 20
    knn_t: float = 0.07
    knn_at_end: bool = True
    knn_every: int = 0  # kNN on the held-out split every N epochs, logged as knn_top1; 0 = off
    # reconstruction grid of 8 fixed samples (RUN/recon_step*.png, and TensorBoard) every N
    # epochs; 0 = only at the end of the run
    vis_every: int = 0
    tensorboard: bool = False  # log scalars + those grids to RUN/tensorboard (cmae[tensorboard])
    # fault tolerance: checkpoints in OUT/checkpoints/, written atomically (docs/RESUME.md)
    resume: str = "auto"  # auto: the newest valid checkpoint in out | never | a checkpoint path
    save_every_epochs: int = 1  # a checkpoint at the end of every N epochs (0: none)
    save_every_steps: int = 0  # and every N steps inside epochs (0: none)
    keep_last: int = 2  # the newest periodic checkpoints kept
    keep_every_epochs: int = 0  # also keep, for good, those of every N-th epoch (0: none)
    max_bad_steps: int = 20  # consecutive NaN/Inf steps (each skipped) that stop the run
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise resume on GPU
    # seconds a collective waits for a silent rank before the job fails (the process-group
    # timeout; with NCCL the process is then torn down): bounds the hang after a rank dies
    dist_timeout: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def from_dict(d: dict[str, Any]) -> Config:
    """A ``Config`` from ``to_dict``'s output (a checkpoint's or config.yaml's), validated."""
    cfg = compose(Config, [("", d)])
    validate(cfg)
    return cfg


def load_config(preset: str | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Dataclass defaults, then the preset/YAML file (if any), then dotted overrides."""
    cfg = load_layered(Config, None if preset is None else preset_path(preset), overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Semantic checks that the types cannot express; each error names its key."""
    from cmae.models.convvit import CONVVIT_SIZES  # local: keep config importable without torch
    from cmae.models.vit import ENCODER_SIZES, vit_size

    m, d, t = cfg.model, cfg.data, cfg.train
    if m.method not in REFERENCE_MASK:
        raise ConfigError(f"model.method: expected 'cmae' or 'mae', got {m.method!r}")
    try:
        vit = vit_size(m.encoder)
    except ValueError as e:
        raise ConfigError(f"model.encoder: {e}") from e
    if vit is None and m.encoder not in CONVVIT_SIZES:
        known = ", ".join([*ENCODER_SIZES, *CONVVIT_SIZES, "vit_{width}x{depth}h{heads}"])
        raise ConfigError(f"model.encoder: unknown {m.encoder!r} (known: {known})")
    if m.encoder in CONVVIT_SIZES and m.patch_size % 4:
        raise ConfigError(
            f"model.patch_size: {m.patch_size} must be a multiple of 4 for {m.encoder} "
            "(the total stride of its stages: patch/4, 2, 2)"
        )
    if m.patch_size <= 0 or m.img_size <= 0 or m.img_size % m.patch_size:
        raise ConfigError(
            f"model.img_size: {m.img_size} must be a positive multiple of "
            f"model.patch_size ({m.patch_size})"
        )
    ratio, block = m.resolved_mask()
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"model.mask_ratio: must be in [0, 1), got {ratio}")
    grid = m.img_size // m.patch_size
    if block < 1 or grid % block:
        raise ConfigError(
            f"model.mask_block: {block} must be >= 1 and divide the {grid}x{grid} grid"
        )
    if int((grid // block) ** 2 * (1 - ratio)) < 1:
        raise ConfigError(f"model.mask_ratio: {ratio} keeps no block of the {grid}x{grid} grid")
    for key in ("decoder_dim", "decoder_heads", "proj_hidden_dim", "proj_dim", "decoder_depth"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}: must be positive, got {getattr(m, key)}")
    if m.decoder_dim % m.decoder_heads:
        raise ConfigError(f"model.decoder_dim: {m.decoder_dim} not divisible by decoder_heads")
    if m.feature_decoder_depth < 0:
        raise ConfigError("model.feature_decoder_depth: must be >= 0")
    if m.temperature <= 0:
        raise ConfigError(f"model.temperature: must be > 0, got {m.temperature}")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {m.drop_path}")
    if not 0 <= d.max_shift < m.img_size:
        raise ConfigError(
            f"data.max_shift: {d.max_shift} must be in [0, model.img_size={m.img_size})"
        )
    for key in ("hflip", "color_jitter_p", "grayscale_p", "blur_p"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ConfigError(f"data.{key}: probability must be in [0, 1], got {getattr(d, key)}")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: need 0 < lo <= hi <= 1, got {d.crop_scale}")
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ConfigError(f"data.crop_ratio: need 0 < lo <= hi, got {d.crop_ratio}")
    if not 0 < d.blur_sigma[0] <= d.blur_sigma[1]:
        raise ConfigError(f"data.blur_sigma: need 0 < lo <= hi, got {d.blur_sigma}")
    if any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: must be positive, got {d.std}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    d.check_synthetic()
    if t.batch_size <= 0:
        raise ConfigError(f"train.batch_size: must be positive, got {t.batch_size}")
    if m.method == "cmae" and t.batch_size < 2:
        raise ConfigError("train.batch_size: the contrastive loss needs at least 2 samples")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs: must be positive, got {t.epochs}")
    if t.warmup_epochs < 0:
        raise ConfigError(f"train.warmup_epochs: must be >= 0, got {t.warmup_epochs}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps: must be positive, got {t.max_steps}")
    for key in ("momentum", "momentum_end"):
        if not 0.0 <= getattr(t, key) <= 1.0:
            raise ConfigError(f"train.{key}: must be in [0, 1], got {getattr(t, key)}")
    if t.lr is not None and t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if t.blr <= 0:
        raise ConfigError(f"train.blr: must be positive, got {t.blr}")
    if t.log_every <= 0:
        raise ConfigError(f"train.log_every: must be positive, got {t.log_every}")
    if t.knn_k <= 0 or t.knn_t <= 0:
        raise ConfigError("train.knn_k / train.knn_t: must be positive")
    if t.knn_every < 0:
        raise ConfigError(f"train.knn_every: must be >= 0 (0 = off), got {t.knn_every}")
    if t.vis_every < 0:
        raise ConfigError(f"train.vis_every: must be >= 0 (0 = at the end only), got {t.vis_every}")
    if t.threads is not None and t.threads <= 0:
        raise ConfigError(f"train.threads: must be positive, got {t.threads}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.amp not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"train.amp: expected auto, bf16, fp16 or none, got {t.amp!r}")
    if t.attention not in ("auto", "fused", "explicit"):
        raise ConfigError(f"train.attention: expected auto, fused or explicit, got {t.attention!r}")
    if t.accum_steps < 1:
        raise ConfigError(f"train.accum_steps: must be >= 1, got {t.accum_steps}")
    if t.batch_size % t.accum_steps:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} must be divisible by train.accum_steps "
            f"({t.accum_steps})"
        )
    if t.accum_steps > 1 and m.method == "cmae" and (m.symmetric or m.target_masked):
        raise ConfigError(
            "train.accum_steps: > 1 cannot be combined with model.symmetric or "
            "model.target_masked (their keys depend on each micro-batch's masks)"
        )
    if not t.resume:
        raise ConfigError("train.resume: expected auto, never or a checkpoint path, got ''")
    for key in ("save_every_epochs", "save_every_steps", "keep_every_epochs"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0 (0 = off), got {getattr(t, key)}")
    for key in ("keep_last", "max_bad_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    if d.resize_device and m.method == "cmae" and d.target_color_aug and not d.target_aug_device:
        raise ConfigError(
            "data.resize_device: the target's colour ops come after the resize, so they must "
            "run on the device too: set data.target_aug_device=true (or data.resize_device=false)"
        )
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {d.max_bad_fraction}")
    if t.min_lr < 0:
        raise ConfigError(f"train.min_lr: must be >= 0, got {t.min_lr}")
    if not 1 <= t.dist_timeout <= 7 * 86400:
        raise ConfigError(
            f"train.dist_timeout: seconds, must be in [1, 604800], got {t.dist_timeout}"
        )
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if t.wd_exempt not in ("reference", "1d"):
        raise ConfigError(f"train.wd_exempt: expected 'reference' or '1d', got {t.wd_exempt!r}")
    if not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: each must be in [0, 1), got {t.betas}")
    for key in ("pixel_weight", "contrast_weight"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key}: must be >= 0, got {getattr(m, key)}")
    for key in ("knn_bank", "knn_queries"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key}: must be positive, got {getattr(d, key)}")
