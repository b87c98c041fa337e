"""Typed configs: dataclass defaults -> YAML presets -> ``key.sub=value`` overrides (OmegaConf).

``base`` is the machinery, ``pretrain`` the ``cmae pretrain`` config, ``eval`` the evaluation
commands' configs; the YAML presets are in cmae/configs, found by name.
"""

from cmae.config.base import ConfigError, compose, parse_overrides, preset_path, to_dict
from cmae.config.eval import (
    EvalConfig,
    EvalDataConfig,
    EvalEncoderConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    load_eval_config,
    validate_eval,
)
from cmae.config.pretrain import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_MASK,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    validate,
)
from cmae.config.segment import (
    SegDataConfig,
    SegEncoderConfig,
    SegmentConfig,
    SegModelConfig,
    load_segment_config,
    validate_segment,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REFERENCE_MASK",
    "SegDataConfig",
    "SegEncoderConfig",
    "SegModelConfig",
    "SegmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalDataConfig",
    "EvalEncoderConfig",
    "FinetuneConfig",
    "KnnConfig",
    "LinprobeConfig",
    "ModelConfig",
    "TrainConfig",
    "compose",
    "from_dict",
    "load_config",
    "load_eval_config",
    "load_segment_config",
    "parse_overrides",
    "preset_path",
    "to_dict",
    "validate",
    "validate_eval",
    "validate_segment",
]
