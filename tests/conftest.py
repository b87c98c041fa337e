from pathlib import Path

import pytest
import torch

from cmae.config import load_config
from cmae.models.cmae import build_model

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"


def tiny_overrides(**extra) -> list[str]:
    """A very small CMAE for unit tests: 16 px, patch 4 (4x4 grid), 2 blocks of width 32."""
    base = {
        "model.encoder": "vit_tiny",
        "model.img_size": 16,
        "model.patch_size": 4,
        "model.decoder_dim": 32,
        "model.decoder_depth": 1,
        "model.decoder_heads": 2,
        "model.feature_decoder_depth": 1,
        "model.proj_hidden_dim": 32,
        "model.proj_dim": 16,
        "data.max_shift": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg():
    def make(**extra):
        return load_config(None, tiny_overrides(**extra))

    return make


@pytest.fixture
def tiny_model(tiny_cfg):
    def make(**extra):
        torch.manual_seed(0)
        return build_model(tiny_cfg(**extra).model)

    return make
