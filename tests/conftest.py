import pytest
import torch

from cmae.config import load_config
from cmae.models.cmae import build_model
from tests.helpers import tiny_overrides


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
