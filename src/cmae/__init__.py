"""cmae: Contrastive Masked Autoencoders for self-supervised ViT pretraining."""

from cmae.config import Config, ConfigError, load_config
from cmae.model import CMAE, CMAEOutput, ViTEncoder, build_encoder, build_model

__version__ = "0.1.0"
__all__ = [
    "CMAE",
    "CMAEOutput",
    "Config",
    "ConfigError",
    "ViTEncoder",
    "build_encoder",
    "build_model",
    "load_config",
]
