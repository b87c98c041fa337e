"""cmae: Contrastive Masked Autoencoders for self-supervised ViT pretraining."""

from cmae.config import Config, ConfigError, load_config
from cmae.interop.api import Encoder, load_encoder
from cmae.interop.export import load_model, load_official
from cmae.models.cmae import CMAE, CMAEOutput, build_encoder, build_model
from cmae.models.vit import ViTEncoder

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
