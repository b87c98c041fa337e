import math

import torch

from cmae.models.cmae import CMAE
from cmae.runtime.optim import cosine_lr, momentum_at, param_groups


def test_cosine_lr_warmup_and_decay():
    assert cosine_lr(0, 100, 10, 1.0) == 0.0
    assert math.isclose(cosine_lr(5, 100, 10, 1.0), 0.5)
    assert math.isclose(cosine_lr(10, 100, 10, 1.0), 1.0)
    assert math.isclose(cosine_lr(55, 100, 10, 1.0), 0.5)
    assert math.isclose(cosine_lr(100, 100, 10, 1.0, min_lr=0.1), 0.1)


def test_momentum_constant_and_cosine():
    assert momentum_at(37, 100, 0.996, 0.996) == 0.996
    assert math.isclose(momentum_at(0, 100, 0.99, 1.0), 0.99)
    assert math.isclose(momentum_at(50, 100, 0.99, 1.0), 0.995)
    assert math.isclose(momentum_at(100, 100, 0.99, 1.0), 1.0)


def test_no_weight_decay_set():
    m = CMAE(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        proj_hidden_dim=16,
        proj_dim=8,
    )
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in nd and "pixel_decoder.mask_token" in nd
    assert "feature_decoder.mask_token" in nd
    assert "encoder.blocks.0.attn.qkv.bias" in nd and "encoder.norm.weight" in nd
    assert "encoder.blocks.0.attn.qkv.weight" in d and "projector.0.weight" in d
    # frozen: target branch and fixed sin-cos position embeddings
    assert not any(n.startswith("target_") or n.endswith("pos_embed") for n in nd | d)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(nd | d) == sum(1 for p in m.parameters() if p.requires_grad)
    assert isinstance(decay["params"][0], torch.nn.Parameter)
