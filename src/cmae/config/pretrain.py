"""The pretraining config (``cmae pretrain``): model, data and train sections.

The dataclass defaults are the reference ViT-B/16 recipe of the CMAE paper (CMAE_SPEC.md); the
``tiny`` preset (the default of ``cmae pretrain``) is the small CPU setting for 32 px images.
Unknown keys and values of the wrong type are errors that name the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cmae.config.base import (
    Choice,
    Colors,
    ConfigError,
    SyntheticSplits,
    bounded,
    check_fields,
    checked,
    compose,
    device_name,
    load_layered,
    preset_path,
    resume_setting,
)
from cmae.models.sizes import CONVVIT_SIZES, ENCODER_SIZES, vit_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Method(Choice):
    cmae = "cmae"  # contrastive + reconstruction
    mae = "mae"  # reconstruction only


class Amp(Choice):
    auto = "auto"  # bf16 on CUDA, none on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


class Attention(Choice):
    # fused: PyTorch's scaled_dot_product_attention; explicit: batched matmuls + softmax, same
    # maths; auto: explicit on the CPU, where it is faster for the short sequences of small
    # images, fused elsewhere (docs/PERFORMANCE.md)
    auto = "auto"
    fused = "fused"
    explicit = "explicit"


# "reference": the official CMAE exemptions (biases, LayerNorms, tokens, pos-embeds; BN weights
# decayed); "1d": every 1-D parameter exempt (MAE's rule). Made by a call: "1d" is no name.
WdExempt = Choice("WdExempt", {"reference": "reference", "1d": "1d"})


@dataclass
class ModelConfig:
    method: Method = Method.cmae
    # a key of models.vit.ENCODER_SIZES or models.convvit.CONVVIT_SIZES, or vit_{W}x{D}h{H}
    encoder: str = "vit_base"
    img_size: int = bounded(224, "> 0")
    patch_size: int = bounded(16, "> 0")
    drop_path: float = bounded(0.0, "[0, 1)")
    # None picks the method's reference value: cmae 0.65 with 2x2 blocks, mae 0.75 per patch
    mask_ratio: float | None = bounded(None, "[0, 1)")
    mask_block: int | None = bounded(None, ">= 1")
    decoder_dim: int = bounded(512, "> 0")
    decoder_depth: int = bounded(8, "> 0")
    decoder_heads: int = bounded(16, "> 0")
    feature_decoder: bool = True  # off: pool the encoder's visible tokens instead
    feature_decoder_depth: int = bounded(2, ">= 0")
    proj_hidden_dim: int = bounded(1536, "> 0")
    proj_dim: int = bounded(256, "> 0")
    norm_pix_loss: bool = True
    temperature: float = bounded(0.07, "> 0")
    pixel_weight: float = bounded(1.0, ">= 0")
    contrast_weight: float = bounded(1.0, ">= 0")
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
    # pixels; master crop is img_size + max_shift, offsets in [0, max_shift)
    max_shift: int = bounded(32, ">= 0")
    # MAE only: its view is the online view of CMAE's crop (the (0, 0) window of an
    # img_size + max_shift crop) instead of its own RandomResizedCrop to img_size
    mae_same_crop: bool = False
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), "(0, 1]", ordered=True)
    crop_ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), "> 0", ordered=True)
    hflip: float = bounded(0.5, "[0, 1]")
    target_color_aug: bool = True
    # the target's colour ops on the training device, batched (views.DeviceTargetColor): the
    # data workers only decode and crop; same ops and parameter distributions
    target_aug_device: bool = False
    # also the random resized crop's resize, flip and shift windows on the training device
    # (views.CropBoxes / DeviceViews): the workers only decode and cut out the crop box. For
    # GPUs starved by the CPU; on the CPU it moves work from the workers to the main process
    resize_device: bool = False
    color_jitter_p: float = bounded(0.8, "[0, 1]")
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = bounded(0.2, "[0, 1]")
    blur_p: float = bounded(0.5, "[0, 1]")
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), "> 0", ordered=True)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = bounded(IMAGENET_STD, "> 0")
    num_workers: int = bounded(8, ">= 0")
    # built-in generated data (used when path is None)
    synthetic_train: int = bounded(5000, "> 0")
    synthetic_val: int = bounded(1000, "> 0")
    synthetic_size: int = bounded(32, "> 0")
    synthetic_seed: int = 0
    synthetic_colors: Colors = Colors.grey
    # kNN check at the end of pretraining on labelled data
    knn_bank: int = bounded(10000, "> 0")  # at most this many labelled train images in the bank
    knn_queries: int = bounded(2000, "> 0")  # at most this many held-out images queried
    # unreadable images are replaced and counted (log.jsonl: bad_images); more than this
    # fraction of an epoch is an error
    max_bad_fraction: float = bounded(0.01, "[0, 1]")


@dataclass
class TrainConfig:
    epochs: int = bounded(1600, "> 0")
    warmup_epochs: float = bounded(40, ">= 0")  # fractions allowed: 0.2 = a fifth of an epoch
    # stop early after this many optimizer steps (smoke tests)
    max_steps: int | None = bounded(None, "> 0")
    # the GLOBAL batch: split over the ranks and the accum_steps
    batch_size: int = bounded(4096, "> 0")
    blr: float = bounded(1.5e-4, "> 0")  # lr = blr * batch_size / 256
    lr: float | None = bounded(None, "> 0")  # absolute lr; overrides blr when set
    min_lr: float = bounded(0.0, ">= 0")
    weight_decay: float = bounded(0.05, ">= 0")
    wd_exempt: WdExempt = WdExempt.reference
    betas: tuple[float, float] = bounded((0.9, 0.95), "[0, 1)")
    momentum: float = bounded(0.996, "[0, 1]")
    # != momentum: cosine ramp from momentum to momentum_end
    momentum_end: float = bounded(0.996, "[0, 1]")
    seed: int = 0
    device: str = checked("auto", device_name)
    # torch intra-op threads on CPU; None = torch default
    threads: int | None = bounded(None, "> 0")
    amp: Amp = Amp.auto  # autocast
    compile: bool = False  # torch.compile the training forward/backward
    attention: Attention = Attention.auto
    # micro-batches per optimizer step; all micro-batches are contrasted with the keys of the
    # whole step's batch, so only BatchNorm statistics differ from one large batch
    accum_steps: int = bounded(1, ">= 1")
    log_every: int = bounded(20, "> 0")
    out: str = "runs/cmae"
    knn_k: int = bounded(20, "> 0")
    knn_t: float = bounded(0.07, "> 0")
    knn_at_end: bool = True
    # kNN on the held-out split every N epochs, logged as knn_top1; 0 = off
    knn_every: int = bounded(0, ">= 0")
    # reconstruction grid of 8 fixed samples (RUN/recon_step*.png, and TensorBoard) every N
    # epochs; 0 = only at the end of the run
    vis_every: int = bounded(0, ">= 0")
    tensorboard: bool = False  # log scalars + those grids to RUN/tensorboard (cmae[tensorboard])
    # fault tolerance: checkpoints in OUT/checkpoints/, written atomically (docs/RESUME.md)
    # auto: the newest valid checkpoint in out | never | a checkpoint path
    resume: str = checked("auto", resume_setting)
    # a checkpoint at the end of every N epochs (0: none)
    save_every_epochs: int = bounded(1, ">= 0")
    save_every_steps: int = bounded(0, ">= 0")  # and every N steps inside epochs (0: none)
    keep_last: int = bounded(2, ">= 1")  # the newest periodic checkpoints kept
    # also keep, for good, those of every N-th epoch (0: none)
    keep_every_epochs: int = bounded(0, ">= 0")
    # consecutive NaN/Inf steps (each skipped) that stop the run
    max_bad_steps: int = bounded(20, ">= 1")
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise resume on GPU
    # seconds a collective waits for a silent rank before the job fails (the process-group
    # timeout; with NCCL the process is then torn down): bounds the hang after a rank dies
    dist_timeout: float = bounded(1800.0, "[1, 604800]")


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
    """The declared checks of every field, then the rules between fields; each error names its
    key."""

    check_fields(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
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
    if m.img_size % m.patch_size:
        raise ConfigError(
            f"model.img_size: {m.img_size} must be a multiple of model.patch_size ({m.patch_size})"
        )
    ratio, block = m.resolved_mask()
    grid = m.img_size // m.patch_size
    if grid % block:
        raise ConfigError(f"model.mask_block: {block} must divide the {grid}x{grid} grid")
    if int((grid // block) ** 2 * (1 - ratio)) < 1:
        raise ConfigError(f"model.mask_ratio: {ratio} keeps no block of the {grid}x{grid} grid")
    if m.decoder_dim % m.decoder_heads:
        raise ConfigError(
            f"model.decoder_dim: {m.decoder_dim} is not divisible by model.decoder_heads "
            f"({m.decoder_heads})"
        )
    if d.max_shift >= m.img_size:
        raise ConfigError(
            f"data.max_shift: {d.max_shift} must be below model.img_size ({m.img_size})"
        )
    if m.method == "cmae" and t.batch_size < 2:
        raise ConfigError("train.batch_size: the contrastive loss needs at least 2 samples")
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
    if d.resize_device and m.method == "cmae" and d.target_color_aug and not d.target_aug_device:
        raise ConfigError(
            "data.resize_device: the target's colour ops come after the resize, so they must "
            "run on the device too: set data.target_aug_device=true (or data.resize_device=false)"
        )
