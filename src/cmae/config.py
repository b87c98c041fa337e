"""Typed configuration: dataclasses -> YAML presets -> ``key.sub=value`` overrides.

The dataclass defaults are the reference ViT-B/16 recipe of the CMAE paper (CMAE_SPEC.md); the
``tiny`` preset (the default of ``cmae pretrain``) is the small CPU setting for 32 px images.
Unknown keys and values of the wrong type are errors that name the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    method: str = "cmae"  # "cmae" (contrastive + reconstruction) or "mae" (reconstruction only)
    # a key of cmae.model.ENCODER_SIZES or cmae.convvit.CONVVIT_SIZES, or vit_{W}x{D}h{H}
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
class DataConfig:
    path: str | None = None  # ImageFolder-style dir; None = built-in generated shapes
    max_shift: int = 32  # pixels; master crop is img_size + max_shift, offsets in [0, max_shift)
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[float, ...]: any non-empty length
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
            return tuple(_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in pairs)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge(cfg: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Recursively apply a nested dict of ``updates`` to dataclass ``cfg`` in place."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    types_ = _field_types(type(cfg))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in types_:
            known = ", ".join(types_)
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, prefix=f"{full}.")
        else:
            setattr(cfg, key, _check_value(full, value, types_[key]))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.mask_ratio=0.5", "train.epochs=3"]`` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (tuples become lists), safe for YAML and weights_only."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    merge(cfg, d)
    validate(cfg)
    return cfg


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(
            f"unknown preset '{name_or_path}' (presets: {names}; or pass a .yaml path)"
        )
    return candidate


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model/data/train)")
    extends = data.pop("extends", None)
    if extends is None:
        return data
    base = load_yaml(preset_path(extends))
    return _deep_update(base, data)


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def load_config(preset: str | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Dataclass defaults, then the preset/YAML file (if any), then dotted overrides."""
    cfg = Config()
    apply_layers(cfg, preset_path(preset) if preset is not None else None, overrides)
    validate(cfg)
    return cfg


def apply_layers(cfg: Any, path: Path | None, overrides: list[str] | None) -> None:
    """Merge a YAML file (errors prefixed with its path), then dotted overrides, into ``cfg``."""
    if path is not None:
        try:
            merge(cfg, load_yaml(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    if overrides:
        merge(cfg, parse_overrides(overrides))


def validate(cfg: Config) -> None:
    """Semantic checks that the types cannot express; each error names its key."""
    from cmae.convvit import CONVVIT_SIZES  # local: keep config importable without torch
    from cmae.model import ENCODER_SIZES, vit_size

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
    for key in ("synthetic_train", "synthetic_val", "synthetic_size"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key}: must be positive, got {getattr(d, key)}")
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


# ---------------------------------------------------------------------------------------------
# evaluation commands (knn, linprobe, finetune): own top-level configs, same merge/validate rules


@dataclass
class EvalEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built
    pool: str = "mean"  # features: "mean" of the patch tokens or the "cls" token


@dataclass
class EvalDataConfig:
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

    def synthetic(self) -> dict[str, int]:
        return {
            "train": self.synthetic_train,
            "val": self.synthetic_val,
            "size": self.synthetic_size,
            "seed": self.synthetic_seed,
        }


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
    device: str = "auto"
    seed: int = 0
    out: str = "runs/finetune"


EvalConfig = KnnConfig | LinprobeConfig | FinetuneConfig


def load_eval_config(
    cls: type[EvalConfig], path: str | None = None, overrides: list[str] | None = None
) -> EvalConfig:
    """Defaults of ``cls``, then a YAML file (e.g. a run's config.yaml), then the overrides."""
    cfg = cls()
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    apply_layers(cfg, Path(path) if path is not None else None, overrides)
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
    for key in ("synthetic_train", "synthetic_val", "synthetic_size"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key}: must be positive, got {getattr(d, key)}")
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
        if any(lr <= 0 for lr in cfg.blrs):
            raise ConfigError(f"blrs: must all be positive, got {cfg.blrs}")
        if cfg.batch_size < 2:
            raise ConfigError("batch_size: BatchNorm needs at least 2 samples per batch")
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


# ---------------------------------------------------------------------------------------------
# `cmae segment`: semantic segmentation with UperNet. The defaults are the offline setting (the
# generated data, a few minutes on 2 CPU cores); configs/segment/ade20k_vit_base.yaml is the
# reference recipe (MAE / CMAE ADE20K, mmsegmentation's mae-base_upernet 160k).

SEGMENT_PRESET_DIR = PRESET_DIR / "segment"


@dataclass
class SegEncoderConfig:
    # checkpoint.pt of `cmae pretrain`, an exported encoder.safetensors, or "random"
    checkpoint: str = "random"
    preset: str = "quick"  # "random" only: the pretraining preset / YAML whose model is built


@dataclass
class SegDataConfig:
    path: str | None = None  # ROOT in the ADE20K layout; None = built-in generated data
    num_classes: int | None = None  # None: ROOT/classes.txt (the generated data: 11)
    reduce_zero_label: bool = True  # label 0 ignored, k -> k - 1 (ADE20K); not for generated
    scale: tuple[int, int] = (256, 64)  # (long, short) side limits; reference (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)  # training rescale ratio
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

    def synthetic(self) -> dict[str, int]:
        return {
            "train": self.synthetic_train,
            "val": self.synthetic_val,
            "size": self.synthetic_size,
            "seed": self.synthetic_seed,
        }


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
    iters: int = 200  # reference 160,000
    max_iters: int | None = None  # stop after this many (the schedule still spans iters)
    warmup_iters: int = 20  # linear warmup from lr x 1e-6; reference 1,500
    batch_size: int = 8  # the GLOBAL batch; reference 16
    lr: float = 5e-4  # reference 1e-4 (for 160k iterations)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65
    power: float = 1.0  # poly decay to min_lr after the warmup
    min_lr: float = 0.0
    eval_every: int = 100  # iterations; the last one is always evaluated; reference 16,000
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
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = SEGMENT_PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in SEGMENT_PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown segment preset '{name_or_path}' (presets: {names}; or a .yaml)")
    return candidate


def load_segment_config(
    preset: str | None = None, overrides: list[str] | None = None
) -> SegmentConfig:
    """Defaults, then a preset / YAML file (e.g. a run's config.yaml), then the overrides."""
    cfg = SegmentConfig()
    apply_layers(cfg, segment_preset_path(preset) if preset is not None else None, overrides)
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
    for key in ("synthetic_train", "synthetic_val", "synthetic_size"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key}: must be positive, got {getattr(d, key)}")
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
