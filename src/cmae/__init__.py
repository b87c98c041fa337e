"""cmae: Contrastive Masked Autoencoders for self-supervised ViT pretraining."""

import importlib

# the public names, imported on first use: `python -m cmae` imports this package before its
# __main__ can install the start-up signal handlers, so importing torch here would come first
_EXPORTS = {
    "Config": "cmae.config",
    "ConfigError": "cmae.config",
    "load_config": "cmae.config",
    "Encoder": "cmae.interop.api",
    "load_encoder": "cmae.interop.api",
    "load_model": "cmae.interop.export",
    "load_official": "cmae.interop.export",
    "CMAE": "cmae.models.cmae",
    "CMAEOutput": "cmae.models.cmae",
    "build_encoder": "cmae.models.cmae",
    "build_model": "cmae.models.cmae",
    "ViTEncoder": "cmae.models.vit",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
