"""Weights in and out: export to timm / full, import of official checkpoints (export), encoder
loading for the evaluation commands (encoders) and the public ``load_encoder`` (api)."""
