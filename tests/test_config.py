import pytest
import yaml

from cmae.config import (
    Config,
    ConfigError,
    KnnConfig,
    LinprobeConfig,
    from_dict,
    load_config,
    load_eval_config,
    parse_overrides,
    to_dict,
)


def test_overrides_parse_and_apply():
    cfg = load_config(
        "tiny",
        [
            "model.mask_ratio=0.5",
            "train.epochs=3",
            "data.crop_scale=[0.3,1]",
            "train.lr=null",
            "data.path=/x/y",
        ],
    )
    assert cfg.model.mask_ratio == 0.5 and cfg.train.epochs == 3
    assert cfg.data.crop_scale == (0.3, 1.0) and cfg.train.lr is None
    assert cfg.data.path == "/x/y"


def test_round_trip_through_dict():
    cfg = load_config("tiny")
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.mask_ratoi=0.5", "unknown config key 'model.mask_ratoi'"),
        ("modle.x=1", "unknown config key 'modle'"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("model.feature_decoder=1", "model.feature_decoder: expected true/false"),
        ("model.temperature=warm", "model.temperature: expected a number"),
        ("data.crop_scale=[0.2]", "data.crop_scale: expected a list of 2 values"),
        ("model.mask_ratio=1.0", "model.mask_ratio"),
        ("model.mask_ratio=-0.1", "model.mask_ratio"),
        ("model.img_size=30", "model.img_size"),
        ("model.mask_block=3", "model.mask_block"),
        ("model.method=byol", "model.method"),
        ("model.encoder=vit_giant", "model.encoder"),
        ("data.max_shift=32", "data.max_shift"),
        ("data.max_shift=-1", "data.max_shift"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.momentum=1.5", "train.momentum"),
        ("data.blur_p=2", "data.blur_p"),
        ("model.temperature=0", "model.temperature"),
        ("train.device=tpu", "train.device"),
        ("data.synthetic_colors=blue", "data.synthetic_colors: expected grey or color"),
        ("train.attention=flash", "train.attention: expected auto, fused or explicit"),
        ("model.decoder_heads=3", "model.decoder_dim"),
        ("train=5", "train: expected a mapping"),
        ("epochs", "not of the form key.sub=value"),
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny", [override])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_with_extends_and_bad_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("extends: tiny\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(good))
    assert cfg.train.epochs == 2 and cfg.model.img_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.widht'"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_defaults_are_the_reference_recipe():
    c = Config()
    assert (c.model.encoder, c.model.img_size, c.model.patch_size) == ("vit_base", 224, 16)
    assert c.model.resolved_mask() == (0.65, 2)
    assert (c.model.decoder_dim, c.model.decoder_depth, c.model.decoder_heads) == (512, 8, 16)
    assert c.model.feature_decoder_depth == 2
    assert (c.model.proj_hidden_dim, c.model.proj_dim, c.model.temperature) == (1536, 256, 0.07)
    assert c.data.max_shift == 32 and c.data.crop_scale == (0.2, 1.0)
    assert (c.train.batch_size, c.train.blr, c.train.weight_decay) == (4096, 1.5e-4, 0.05)
    assert c.train.betas == (0.9, 0.95) and c.train.momentum == c.train.momentum_end == 0.996
    assert (c.train.epochs, c.train.warmup_epochs) == (1600, 40)


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "train.blr=.nan",
        "train.min_lr=.inf",
        "train.weight_decay=.inf",
        "train.momentum=.nan",
        "train.momentum_end=-.inf",
    ],
)
def test_non_finite_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config("quick", [override])


@pytest.mark.parametrize(
    "raw, value", [("1e6", 1e6), ("1E-4", 1e-4), ("2.5e+3", 2500.0), (".5e1", 5.0)]
)
def test_exponent_without_dot_is_a_number(raw, value):
    # PyYAML (YAML 1.1) reads 1e6 as a string; the config reads it as the number it spells
    assert load_config("quick", [f"train.lr={raw}"]).train.lr == value
    assert load_config("quick", [f"model.temperature={raw}"]).model.temperature == value
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config("quick", [f"train.epochs={raw}"])


def test_yaml_syntax_error_is_one_line_naming_the_file_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert msg.count(str(bad)) == 1 and "\n" not in msg and "line 3, column 9" in msg


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("extends: tiny\ntrain:\n  lr: 1e-3\n  blr: 1e6\n")
    cfg = load_config(str(f), ["train.min_lr=1e-6"])
    assert (cfg.train.lr, cfg.train.blr, cfg.train.min_lr) == (1e-3, 1e6, 1e-6)


def test_config_yaml_round_trip(tmp_path):
    cfg = load_config("quick", ["train.epochs=3", "data.crop_scale=[0.3,1]"])
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(str(f)) == cfg


@pytest.mark.parametrize(
    "cls,override,needle",
    [
        (KnnConfig, "encoder.pol=cls", "unknown config key 'encoder.pol'"),
        (KnnConfig, "k=abc", "k: expected an integer"),
        (KnnConfig, "data.mean=[1,2]", "data.mean: expected a list of 3 values"),
        (LinprobeConfig, "blrs=5", "blrs: expected a non-empty list"),
        (LinprobeConfig, "cache=2", "cache: expected true/false"),
    ],
)
def test_eval_config_errors_name_the_key(cls, override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_eval_config(cls, None, [override])


def test_built_in_data_colours_default_per_command():
    from cmae.config.eval import KnnConfig, load_eval_config
    from cmae.config.segment import load_segment_config

    # pretraining and the evaluation commands read the same (grey) generated shapes; the
    # generated segmentation scenes keep their colours
    assert load_config(None).data.synthetic_colors == "grey"
    assert load_config("quick").data.synthetic()["colors"] == "grey"
    assert load_eval_config(KnnConfig, None, []).data.synthetic_colors == "grey"
    assert load_segment_config(None, []).data.synthetic_colors == "color"
