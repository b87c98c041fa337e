"""Every config check, as (bad overrides -> the key its one-line ConfigError names), per command.

Each row is an override list that must be refused when applied to the command's default config
(``cmae pretrain``: the tiny preset; the evaluation and segment commands: their defaults)."""

import re

import pytest
import torch
import yaml

from cmae.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    load_config,
    load_eval_config,
    load_segment_config,
    to_dict,
)
from cmae.config.base import compose
from cmae.config.detect import DetectConfig, load_detect_config
from cmae.config.segment import SegmentConfig

PRETRAIN = [
    (["model.method=byol"], "model.method"),
    (["model.encoder=vit_giant"], "model.encoder"),
    (["model.encoder=vit_66x2h3"], "model.encoder"),
    (["model.encoder=convvit_tiny", "model.patch_size=2"], "model.patch_size"),
    (["model.img_size=30"], "model.img_size"),
    (["model.img_size=0"], "model.img_size"),
    (["model.patch_size=0"], "model.patch_size"),
    (["model.patch_size=-4"], "model.patch_size"),
    (["model.mask_ratio=1.0"], "model.mask_ratio"),
    (["model.mask_ratio=-0.1"], "model.mask_ratio"),
    (["model.mask_ratio=0.99"], "model.mask_ratio"),
    (["model.mask_block=3"], "model.mask_block"),
    (["model.mask_block=0"], "model.mask_block"),
    (["model.decoder_dim=0"], "model.decoder_dim"),
    (["model.decoder_heads=0"], "model.decoder_heads"),
    (["model.decoder_heads=3"], "model.decoder_dim"),
    (["model.decoder_depth=0"], "model.decoder_depth"),
    (["model.proj_hidden_dim=0"], "model.proj_hidden_dim"),
    (["model.proj_dim=-1"], "model.proj_dim"),
    (["model.feature_decoder_depth=-1"], "model.feature_decoder_depth"),
    (["model.temperature=0"], "model.temperature"),
    (["model.temperature=-1"], "model.temperature"),
    (["model.drop_path=1.0"], "model.drop_path"),
    (["model.drop_path=-0.1"], "model.drop_path"),
    (["model.pixel_weight=-1"], "model.pixel_weight"),
    (["model.contrast_weight=-0.5"], "model.contrast_weight"),
    (["data.max_shift=32"], "data.max_shift"),
    (["data.max_shift=-1"], "data.max_shift"),
    (["data.hflip=1.5"], "data.hflip"),
    (["data.color_jitter_p=-0.1"], "data.color_jitter_p"),
    (["data.grayscale_p=2"], "data.grayscale_p"),
    (["data.blur_p=2"], "data.blur_p"),
    (["data.crop_scale=[0,1]"], "data.crop_scale"),
    (["data.crop_scale=[0.5,0.2]"], "data.crop_scale"),
    (["data.crop_scale=[0.2,1.5]"], "data.crop_scale"),
    (["data.crop_ratio=[0,1]"], "data.crop_ratio"),
    (["data.crop_ratio=[2,1]"], "data.crop_ratio"),
    (["data.blur_sigma=[0,1]"], "data.blur_sigma"),
    (["data.blur_sigma=[2,1]"], "data.blur_sigma"),
    (["data.std=[0.2,0,0.2]"], "data.std"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.synthetic_train=0"], "data.synthetic_train"),
    (["data.synthetic_val=-1"], "data.synthetic_val"),
    (["data.synthetic_size=0"], "data.synthetic_size"),
    (["data.synthetic_colors=blue"], "data.synthetic_colors"),
    (["data.resize_device=true"], "data.resize_device"),
    (["data.max_bad_fraction=1.5"], "data.max_bad_fraction"),
    (["data.max_bad_fraction=-0.1"], "data.max_bad_fraction"),
    (["data.knn_bank=0"], "data.knn_bank"),
    (["data.knn_queries=-1"], "data.knn_queries"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=1"], "train.batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.momentum=1.5"], "train.momentum"),
    (["train.momentum_end=-0.1"], "train.momentum_end"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1"], "train.lr"),
    (["train.blr=0"], "train.blr"),
    (["train.min_lr=-1"], "train.min_lr"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.wd_exempt=2d"], "train.wd_exempt"),
    (["train.betas=[0.9,1.0]"], "train.betas"),
    (["train.betas=[-0.1,0.9]"], "train.betas"),
    (["train.log_every=0"], "train.log_every"),
    (["train.knn_k=0"], "train.knn_k"),
    (["train.knn_t=0"], "train.knn_t"),
    (["train.knn_every=-1"], "train.knn_every"),
    (["train.vis_every=-1"], "train.vis_every"),
    (["train.threads=0"], "train.threads"),
    (["train.device=tpu"], "train.device"),
    (["train.device=CPU"], "train.device"),
    (["train.device=cuda:"], "train.device"),
    (["train.device=cuda:x"], "train.device"),
    (["train.amp=fp8"], "train.amp"),
    (["train.attention=flash"], "train.attention"),
    (["train.accum_steps=0"], "train.accum_steps"),
    (["train.accum_steps=3"], "train.batch_size"),
    (["train.accum_steps=2", "model.symmetric=true"], "train.accum_steps"),
    (["train.accum_steps=2", "model.target_masked=true"], "train.accum_steps"),
    (["train.resume=''"], "train.resume"),
    (["train.save_every_epochs=-1"], "train.save_every_epochs"),
    (["train.save_every_steps=-1"], "train.save_every_steps"),
    (["train.keep_every_epochs=-1"], "train.keep_every_epochs"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    # checked while the layers are merged, before the checks above
    (["model.mask_ratoi=0.5"], "model.mask_ratoi"),
    (["train.epochs=1.5"], "train.epochs"),
    (["model.feature_decoder=1"], "model.feature_decoder"),
    (["data.crop_scale=[0.2]"], "data.crop_scale"),
    (["train.lr=.inf"], "train.lr"),
    (["train=5"], "train"),
]

# for each evaluation command; a tuple of classes where a check is shared
EVAL_ALL = (KnnConfig, LinprobeConfig, FinetuneConfig)
TRAINED = (LinprobeConfig, FinetuneConfig)
EVAL = [
    (EVAL_ALL, ["encoder.pool=max"], "encoder.pool"),
    (EVAL_ALL, ["encoder.preset=nope"], "encoder.preset"),
    (EVAL_ALL, ["data.crop_pct=0"], "data.crop_pct"),
    (EVAL_ALL, ["data.crop_pct=1.5"], "data.crop_pct"),
    (EVAL_ALL, ["data.std=[0.2,0.2,0]"], "data.std"),
    (EVAL_ALL, ["data.num_workers=-1"], "data.num_workers"),
    (EVAL_ALL, ["data.synthetic_train=0"], "data.synthetic_train"),
    (EVAL_ALL, ["data.synthetic_val=0"], "data.synthetic_val"),
    (EVAL_ALL, ["data.synthetic_size=-1"], "data.synthetic_size"),
    (EVAL_ALL, ["data.synthetic_colors=pink"], "data.synthetic_colors"),
    (EVAL_ALL, ["batch_size=0"], "batch_size"),
    (EVAL_ALL, ["device=tpu"], "device"),
    (EVAL_ALL, ["encoder.pol=cls"], "encoder.pol"),
    ((KnnConfig,), ["k=0"], "k"),
    ((KnnConfig,), ["temperature=0"], "temperature"),
    (TRAINED, ["epochs=0"], "epochs"),
    (TRAINED, ["warmup_epochs=-1"], "warmup_epochs"),
    (TRAINED, ["warmup_epochs=200"], "warmup_epochs"),
    ((LinprobeConfig,), ["mode=slow"], "mode"),
    ((LinprobeConfig,), ["optimizer=adam"], "optimizer"),
    ((LinprobeConfig,), ["blrs=[0.1,-1]"], "blrs"),
    ((LinprobeConfig,), ["blrs=[]"], "blrs"),
    ((LinprobeConfig,), ["batch_size=1"], "batch_size"),
    ((LinprobeConfig,), ["lr_from=test"], "lr_from"),
    ((LinprobeConfig,), ["lr_from=train", "mode=full"], "lr_from"),
    ((LinprobeConfig,), ["lr_holdout=0"], "lr_holdout"),
    ((LinprobeConfig,), ["lr_holdout=1"], "lr_holdout"),
    ((FinetuneConfig,), ["blr=0"], "blr"),
    ((FinetuneConfig,), ["min_lr=-1"], "min_lr"),
    ((FinetuneConfig,), ["weight_decay=-1"], "weight_decay"),
    ((FinetuneConfig,), ["layer_decay=0"], "layer_decay"),
    ((FinetuneConfig,), ["layer_decay=1.5"], "layer_decay"),
    ((FinetuneConfig,), ["drop_path=1"], "drop_path"),
    ((FinetuneConfig,), ["reprob=1.5"], "reprob"),
    ((FinetuneConfig,), ["mixup=-1"], "mixup"),
    ((FinetuneConfig,), ["cutmix=-1"], "cutmix"),
    ((FinetuneConfig,), ["batch_size=1023"], "batch_size"),
    ((FinetuneConfig,), ["smoothing=1"], "smoothing"),
    ((FinetuneConfig,), ["trainable_blocks=-1"], "trainable_blocks"),
    ((FinetuneConfig,), ["eval_every=0"], "eval_every"),
    ((FinetuneConfig,), ["save_every=-1"], "save_every"),
    ((FinetuneConfig,), ["resume=''"], "resume"),
    ((FinetuneConfig,), ["keep_last=0"], "keep_last"),
    ((FinetuneConfig,), ["max_bad_fraction=2"], "max_bad_fraction"),
]

SEGMENT = [
    (["encoder.preset=nope"], "encoder.preset"),
    (["data.num_classes=0"], "data.num_classes"),
    (["data.num_classes=256"], "data.num_classes"),
    (["data.scale=[0,64]"], "data.scale"),
    (["data.ratio_range=[0,2]"], "data.ratio_range"),
    (["data.ratio_range=[2,1]"], "data.ratio_range"),
    (["data.crop=0"], "data.crop"),
    (["data.stride=0"], "data.stride"),
    (["data.stride=65"], "data.stride"),
    (["data.cat_max_ratio=0"], "data.cat_max_ratio"),
    (["data.cat_max_ratio=1.5"], "data.cat_max_ratio"),
    (["data.hflip=2"], "data.hflip"),
    (["data.std=[0,1,1]"], "data.std"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.vis_images=-1"], "data.vis_images"),
    (["data.synthetic_train=0"], "data.synthetic_train"),
    (["data.synthetic_colors=blue"], "data.synthetic_colors"),
    (["model.channels=0"], "model.channels"),
    (["model.aux_channels=-1"], "model.aux_channels"),
    (["model.aux_weight=-1"], "model.aux_weight"),
    (["model.pool_scales=[]"], "model.pool_scales"),
    (["model.pool_scales=[1,0]"], "model.pool_scales"),
    (["model.out_indices=[1,2,3]"], "model.out_indices"),
    (["model.dropout=1"], "model.dropout"),
    (["model.drop_path=-0.1"], "model.drop_path"),
    (["model.layer_scale=0"], "model.layer_scale"),
    (["iters=0"], "iters"),
    (["warmup_iters=-1"], "warmup_iters"),
    (["warmup_iters=500"], "warmup_iters"),
    (["max_iters=0"], "max_iters"),
    (["batch_size=0"], "batch_size"),
    (["lr=0"], "lr"),
    (["min_lr=-1"], "min_lr"),
    (["weight_decay=-1"], "weight_decay"),
    (["power=0"], "power"),
    (["layer_decay=0"], "layer_decay"),
    (["betas=[1.0,0.9]"], "betas"),
    (["eval_every=-1"], "eval_every"),
    (["save_every=-1"], "save_every"),
    (["log_every=0"], "log_every"),
    (["keep_last=0"], "keep_last"),
    (["amp=fp16"], "amp"),
    (["threads=0"], "threads"),
    (["device=tpu"], "device"),
    (["resume=''"], "resume"),
]


DETECT = [
    (["encoder.preset=nope"], "encoder.preset"),
    (["data.size=0"], "data.size"),
    (["data.scale_range=[0,2]"], "data.scale_range"),
    (["data.scale_range=[2,1]"], "data.scale_range"),
    (["data.hflip=2"], "data.hflip"),
    (["data.std=[0,1,1]"], "data.std"),
    (["data.max_bad_fraction=1.5"], "data.max_bad_fraction"),
    (["data.max_bad_fraction=1"], "data.max_bad_fraction"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.vis_images=-1"], "data.vis_images"),
    (["data.synthetic_train=0"], "data.synthetic_train"),
    (["data.synthetic_size=8"], "data.synthetic_size"),
    (["model.window_size=0"], "model.window_size"),
    (["model.global_blocks=[-1]"], "model.global_blocks"),
    (["model.drop_path=1"], "model.drop_path"),
    (["model.anchor_sizes=[8,16]"], "model.anchor_sizes"),
    (["model.anchor_sizes=[8,16,32,64,0]"], "model.anchor_sizes"),
    (["model.channels=0"], "model.channels"),
    (["model.rois_per_image=0"], "model.rois_per_image"),
    (["model.proposals=0"], "model.proposals"),
    (["model.detections_per_image=0"], "model.detections_per_image"),
    (["iters=0"], "iters"),
    (["warmup_iters=-1"], "warmup_iters"),
    (["warmup_iters=400"], "warmup_iters"),
    (["warmup_factor=0"], "warmup_factor"),
    (["lr_steps=[20,10]"], "lr_steps"),
    (["lr_steps=[0]"], "lr_steps"),
    (["lr_gamma=0"], "lr_gamma"),
    (["max_iters=0"], "max_iters"),
    (["batch_size=0"], "batch_size"),
    (["lr=0"], "lr"),
    (["weight_decay=-1"], "weight_decay"),
    (["layer_decay=0"], "layer_decay"),
    (["betas=[1.0,0.9]"], "betas"),
    (["eval_every=-1"], "eval_every"),
    (["save_every=-1"], "save_every"),
    (["log_every=0"], "log_every"),
    (["keep_last=0"], "keep_last"),
    (["max_bad_steps=0"], "max_bad_steps"),
    (["amp=fp16"], "amp"),
    (["threads=0"], "threads"),
    (["device=tpu"], "device"),
    (["resume=''"], "resume"),
]


def row_id(value) -> str | None:
    if isinstance(value, list):
        return " ".join(value)
    return value.__name__ if isinstance(value, type) else None


def assert_names(exc: ConfigError, key: str) -> None:
    """One line, naming ``key`` as a whole word (not as part of a longer key)."""
    msg = str(exc)
    assert "\n" not in msg, msg
    assert re.search(rf"(?<!\w){re.escape(key)}(?!\w)", msg), f"{key!r} not named in: {msg}"


@pytest.mark.parametrize("overrides,key", PRETRAIN, ids=row_id)
def test_pretrain_check_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert_names(e.value, key)


@pytest.mark.parametrize(
    "cls,overrides,key",
    [(cls, o, k) for classes, o, k in EVAL for cls in classes],
    ids=row_id,
)
def test_eval_check_names_the_key(cls, overrides, key):
    with pytest.raises(ConfigError) as e:
        load_eval_config(cls, None, overrides)
    assert_names(e.value, key)


@pytest.mark.parametrize("overrides,key", DETECT, ids=row_id)
def test_detect_check_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_detect_config(None, overrides)
    assert_names(e.value, key)


@pytest.mark.parametrize("overrides,key", SEGMENT, ids=row_id)
def test_segment_check_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_segment_config(None, overrides)
    assert_names(e.value, key)


def test_the_defaults_pass():
    # the rows above fail because of their overrides, not because the base config is refused
    load_config("tiny")
    for cls in EVAL_ALL:
        load_eval_config(cls, None, [])
    load_segment_config(None, [])
    load_detect_config(None, [])


def test_a_bad_choice_names_the_allowed_values():
    with pytest.raises(
        ConfigError, match=r"^train.amp: expected auto, bf16, fp16 or none, got 'x'"
    ):
        load_config("tiny", ["train.amp=x"])
    with pytest.raises(ConfigError, match=r"^amp: expected auto, bf16 or none, got 'fp16'"):
        load_segment_config(None, ["amp=fp16"])


def test_device_takes_cuda_with_an_index():
    assert load_config("tiny", ["train.device=cuda:1"]).train.device == "cuda:1"


def test_choices_are_plain_strings_in_config_yaml_and_checkpoints(tmp_path):
    cfg = load_config("tiny", ["model.method=mae", "train.wd_exempt=1d", "train.amp=bf16"])
    # a choice is its string to code that compares, formats or looks it up
    assert cfg.model.method == "mae" and f"{cfg.train.amp}" == "bf16" == str(cfg.train.amp)
    assert {"bf16": 1}[cfg.train.amp] == 1 and cfg.train.wd_exempt in ("reference", "1d")
    d = to_dict(cfg)
    assert type(d["model"]["method"]) is str and d["train"]["wd_exempt"] == "1d"
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))  # safe_dump refuses anything but builtins
    assert "method: mae" in f.read_text() and load_config(str(f)) == cfg
    torch.save({"config": d}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["config"] == d


@pytest.mark.parametrize(
    "cls", [Config, SegmentConfig, DetectConfig, KnnConfig, LinprobeConfig, FinetuneConfig]
)
def test_every_config_round_trips_through_its_dict(cls):
    cfg = compose(cls, [])
    assert compose(cls, [("", to_dict(cfg))]) == cfg == cls()
