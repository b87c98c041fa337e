"""cmae: Contrastive Masked Autoencoders for self-supervised ViT pretraining."""

from cmae.api import Encoder, load_encoder
from cmae.config import Config, ConfigError, load_config
from cmae.export import load_model, load_official
from cmae.model import CMAE, CMAEOutput, ViTEncoder, build_encoder, build_model

__version__ = "0.1.0"
__all__ = [
    "CMAE",
    "CMAEOutput",
    "Config",
    "ConfigError",
    "Encoder",
    "ViTEncoder",
    "build_encoder",
    "build_model",
    "load_config",
    "load_encoder",
    "load_model",
    "load_official",
]
