"""Typed configs: dataclasses -> YAML presets -> ``key.sub=value`` overrides."""

from cmae.config.pretrain import *  # noqa: F401,F403
