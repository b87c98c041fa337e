import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cmae.eval.finetune import build_mixup, freeze_for_partial, train_transform
from cmae.interop.encoders import EncoderWeights, build_timm_vit, build_vit_encoder
from cmae.models.cmae import build_encoder
from cmae.runtime.optim import layer_decay_groups


@pytest.fixture
def weights(tiny_cfg) -> EncoderWeights:
    """vit_tiny (12 x 192) at 16 px, patch 4, freshly initialised."""
    m = tiny_cfg().model
    torch.manual_seed(0)
    return EncoderWeights(
        build_encoder(m).state_dict(), m.encoder, m.img_size, m.patch_size, None, None, "test"
    )


def layer_id(name: str, depth: int) -> int:
    """MAE's layer ids: tokens and patch embed 0, block i -> i + 1, norm and head depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def test_layer_decay_scales_follow_the_spec(weights):
    model = build_timm_vit(weights, num_classes=5)
    depth = len(model.blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65):
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            expected = 0.65 ** (depth + 1 - layer_id(name, depth))
            assert group["lr_scale"] == pytest.approx(expected), name
            no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())
    stem = min(g["lr_scale"] for g in layer_decay_groups(model, 0.05, 0.65))
    assert depth == 12 and stem == pytest.approx(0.65**13)
    flat = {g["lr_scale"] for g in layer_decay_groups(model, 0.05, 1.0)}
    assert flat == {1.0}


def test_partial_finetuning_trains_only_the_last_blocks_and_head(weights):
    model = build_timm_vit(weights, num_classes=5)
    freeze_for_partial(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in trainable if n.startswith("blocks.")} == {"10", "11"}
    assert {n for n in trainable if not n.startswith("blocks.")} == {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    grouped = {id(p) for g in layer_decay_groups(model, 0.05, 0.65) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    freeze_for_partial(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    full = build_timm_vit(weights, num_classes=5)
    freeze_for_partial(full, None)
    assert all(p.requires_grad for p in full.parameters())


def test_timm_vit_carries_the_encoder(weights):
    enc = build_vit_encoder(weights).eval()
    x = torch.randn(2, 3, 16, 16)
    # cls pooling keeps the pretrained final norm: timm's features equal our encoder's tokens
    vit_cls = build_timm_vit(weights, num_classes=5, pool="cls").eval()
    torch.testing.assert_close(vit_cls.forward_features(x), enc(x))
    # mean pooling: pre-norm tokens identical, final norm replaced by a fresh fc_norm
    vit_avg = build_timm_vit(weights, num_classes=5, pool="mean").eval()
    torch.testing.assert_close(vit_avg.forward_features(x), enc(x, final_norm=False))
    assert vit_avg.global_pool == "avg" and isinstance(vit_avg.fc_norm, torch.nn.LayerNorm)
    # MAE head init: trunc-normal std 2e-5, so the first logits are almost zero
    assert vit_avg.head.weight.std() < 1e-4 and vit_avg(x).abs().max() < 1e-2


def test_drop_path_reaches_the_blocks(weights):
    none = build_timm_vit(weights, 5, drop_path=0.0)
    some = build_timm_vit(weights, 5, drop_path=0.2)
    assert isinstance(none.blocks[-1].drop_path1, torch.nn.Identity)
    assert some.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_mixup_switches_and_soft_targets():
    assert build_mixup(0.0, 0.0, 0.1, 10) is None
    torch.manual_seed(0)
    mix = build_mixup(0.8, 1.0, 0.1, num_classes=10)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x.clone(), y)
    assert ym.shape == (4, 10)
    torch.testing.assert_close(ym.sum(dim=1), torch.ones(4))
    assert ym.max() < 1.0  # mixed and smoothed: no hard one-hot left
    smooth = build_mixup(0.0, 1.0, 0.0, num_classes=10)
    assert smooth.label_smoothing == 0.0 and mix.label_smoothing == 0.1


def test_rand_augment_flag_changes_the_train_view():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mean, std = (0.5,) * 3, (0.25,) * 3

    def views(spec: str) -> torch.Tensor:
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        t = train_transform(16, spec, mean, std)
        return torch.stack([t(img) for _ in range(8)])

    plain, augmented = views(""), views("rand-m9-mstd0.5-inc1")
    assert plain.dtype == torch.uint8 and plain.shape == (8, 3, 16, 16)
    assert not torch.equal(plain, augmented)
    assert "RandAugment" in repr(train_transform(16, "rand-m9-mstd0.5-inc1", mean, std))
    assert "RandAugment" not in repr(train_transform(16, "", mean, std))
