"""The ViTDet Mask R-CNN model (`cmae.models.vitdet`): pyramid shapes and strides, window and
global attention, relative positions, the torchvision detector around it, layer decay."""

import copy

import pytest
import torch

from cmae.models.convvit import ConvViT
from cmae.models.vit import ViTEncoder
from cmae.models.vitdet import (
    PadOnlyTransform,
    ViTDetBackbone,
    WindowedViT,
    build_detector,
    decomposed_rel_pos_bias,
    default_global_blocks,
    relative_embeddings,
    window_partition,
    window_unpartition,
)
from cmae.runtime.optim import layer_decay_groups

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# a 4-block ViT of width 32, patch 8, pretrained at 32 px (a 4x4 grid)
DIM, DEPTH, HEADS, PATCH = 32, 4, 2, 8


def small_vit(seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    enc = ViTEncoder(32, PATCH, DIM, DEPTH, HEADS)
    enc.init_weights()
    with torch.no_grad():  # not sin-cos: its resampling must matter
        enc.pos_embed.add_(0.1 * torch.randn_like(enc.pos_embed))
    return enc


def small_convvit(seed: int = 0) -> ConvViT:
    torch.manual_seed(seed)
    enc = ConvViT(32, PATCH, (8, 16, DIM), (1, 1, 2), HEADS)
    enc.init_weights()
    return enc


def small_detector(encoder, img_size: int = 64, **kw):
    kw = {
        "window_size": 3,
        "drop_path": 0.0,
        "num_rois": 16,
        "rpn_post_nms_train": 64,
        "rpn_post_nms_test": 32,
        "detections_per_img": 10,
        "out_channels": 16,
        **kw,
    }
    if isinstance(encoder, ConvViT):
        kw.pop("window_size")
    return build_detector(
        encoder, num_classes=3, img_size=img_size, image_mean=MEAN, image_std=STD, **kw
    )


def instance_targets(sizes):
    """One box (with its filled mask) per image, at the same place."""
    targets = []
    for h, w in sizes:
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 8:40, 12:44] = 1
        boxes = torch.tensor([[12.0, 8.0, 44.0, 40.0]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1]), "masks": masks})
    return targets


def test_default_global_blocks():
    assert default_global_blocks(12) == (2, 5, 8, 11)  # ViTDet's ViT-B
    assert default_global_blocks(24) == (5, 11, 17, 23)  # ViT-L
    assert default_global_blocks(32) == (7, 15, 23, 31)  # ViT-H
    assert default_global_blocks(6) == (0, 2, 3, 5)
    assert default_global_blocks(3) == (0, 1, 2)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 7, 5, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (9, 6) and windows.shape == (2 * 3 * 2, 3, 3, 3)
    assert torch.equal(windows[0], x[0, :3, :3])  # the first window: the top-left corner
    assert windows[5, 1:].abs().sum() == 0  # the bottom-right window is mostly padding
    assert torch.equal(window_unpartition(windows, 3, padded, (7, 5)), x)


@pytest.mark.parametrize("make", [small_vit, small_convvit])
def test_pyramid_levels_and_strides(make):
    model = small_detector(make(), img_size=64)
    feats = model.backbone(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert model.backbone.strides == (2, 4, 8, 16, 32)
    for f, stride in zip(feats.values(), model.backbone.strides, strict=True):
        assert f.shape == (2, 16, 64 // stride, 64 // stride)


def test_vit_pyramid_at_patch_16_is_strides_4_to_64():
    torch.manual_seed(0)
    enc = ViTEncoder(32, 16, DIM, DEPTH, HEADS)
    model = small_detector(enc, img_size=128, window_size=4)
    shapes = [f.shape[-1] for f in model.backbone(torch.randn(1, 3, 128, 128)).values()]
    assert model.backbone.strides == (4, 8, 16, 32, 64) and shapes == [32, 16, 8, 4, 2]


def test_global_and_window_blocks_and_rel_pos_tables():
    model = small_detector(small_vit(), img_size=64, window_size=3, global_blocks=(1, 3))
    blocks = model.backbone.encoder.blocks
    assert [b.window_size for b in blocks] == [3, 0, 3, 0]
    # window blocks: tables for the window (2*3-1 rows); global ones: for the 8x8 grid
    assert [b.attn.rel_pos_h.shape[0] for b in blocks] == [5, 15, 5, 15]
    assert all(b.attn.rel_pos_w.shape == (b.attn.rel_pos_h.shape[0], DIM // HEADS) for b in blocks)
    default = small_detector(small_vit(), img_size=64)
    assert [b.window_size for b in default.backbone.encoder.blocks] == [0, 0, 0, 0]


def test_window_attention_stays_in_its_window():
    """A window block mixes tokens only inside a window; a global block mixes them all."""
    enc = small_vit()
    trunk = WindowedViT(enc, (8, 8), 4, (), rel_pos_bias=False, drop_path=0.0).eval()
    block = trunk.blocks[0]
    x = torch.randn(1, 8, 8, DIM)
    y = x.clone()
    y[0, 0, 0] = torch.randn(DIM)  # another token in the top-left window
    diff = (block(x) - block(y)).abs().sum(-1)[0]
    assert diff[:4, :4].min() > 0  # every token of its window sees it
    assert diff[4:].max() == 0 and diff[:, 4:].max() == 0  # no other window does
    block.window_size = 0  # the same weights, global
    diff = (block(x) - block(y)).abs().sum(-1)[0]
    assert diff.min() > 0


def test_window_at_least_the_grid_equals_global_attention():
    enc = small_vit()
    x = torch.randn(1, 3, 64, 64)
    a = WindowedViT(copy.deepcopy(enc), (8, 8), 8, (), False, 0.0).eval()
    b = WindowedViT(copy.deepcopy(enc), (8, 8), 8, (0, 1, 2, 3), False, 0.0).eval()
    torch.testing.assert_close(a(x), b(x))


def test_relative_embeddings_lookup_and_resampling():
    table = torch.arange(5.0)[:, None].expand(5, 2)  # row r holds r
    emb = relative_embeddings(table, 3)
    assert emb.shape == (3, 3, 2)
    for i in range(3):
        for j in range(3):
            assert emb[i, j, 0] == i - j + 2
    # made for length 3, used at length 5: a linearly resampled table of 9 rows
    assert relative_embeddings(table, 5).shape == (5, 5, 2)


def test_decomposed_bias_against_a_loop():
    torch.manual_seed(0)
    h, w, c = 3, 2, 4
    q = torch.randn(1, 2, h * w, c)
    th, tw = torch.randn(2 * h - 1, c), torch.randn(2 * w - 1, c)
    bias = decomposed_rel_pos_bias(q, th, tw, (h, w))
    ref = torch.zeros(1, 2, h * w, h * w)
    for n in range(2):
        for y in range(h):
            for x in range(w):
                for y2 in range(h):
                    for x2 in range(w):
                        qi = q[0, n, y * w + x]
                        value = qi @ th[y - y2 + h - 1] + qi @ tw[x - x2 + w - 1]
                        ref[0, n, y * w + x, y2 * w + x2] = value
    torch.testing.assert_close(bias, ref)


def test_rel_pos_zero_init_changes_nothing_until_trained():
    enc = small_vit()
    kw = {"img_size": 64, "window_size": 3, "global_blocks": (1, 3)}
    with_rel = small_detector(copy.deepcopy(enc), rel_pos_bias=True, **kw).backbone.eval()
    without = small_detector(copy.deepcopy(enc), rel_pos_bias=False, **kw).backbone.eval()
    without.pyramid.load_state_dict(with_rel.pyramid.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(with_rel(x)["0"], without(x)["0"])
    with torch.no_grad():
        for blk in with_rel.encoder.blocks:
            blk.attn.rel_pos_h.normal_(std=0.5)
    assert not torch.allclose(with_rel(x)["0"], without(x)["0"])


def test_position_embedding_resampled_and_trainable():
    enc = small_vit()
    pretrained = enc.pos_embed.detach().clone()
    model = small_detector(enc, img_size=64)
    trunk = model.backbone.encoder
    assert trunk.pos_embed.shape == pretrained.shape and trunk.pos_embed.requires_grad
    trunk(torch.randn(1, 3, 64, 64)).sum().backward()
    assert trunk.pos_embed.grad is not None and trunk.pos_embed.grad.abs().sum() > 0
    # the cls position is dropped: no gradient reaches it
    assert trunk.pos_embed.grad[0, 0].abs().sum() == 0


@pytest.mark.parametrize("make", [small_vit, small_convvit])
def test_train_losses_backward_and_eval_predictions(make):
    torch.manual_seed(0)
    model = small_detector(make(), img_size=64)
    sizes = [(64, 56), (48, 64)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    model.train()
    losses = model(images, instance_targets(sizes))
    names = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == names and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for prefix in ("backbone.encoder.blocks.0.", "rpn.", "roi_heads.box_head", "roi_heads.mask_"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if prefix in n)
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2
    for pred, (h, w) in zip(preds, sizes, strict=True):
        assert set(pred) == {"boxes", "labels", "scores", "masks"}
        k = len(pred["boxes"])
        assert pred["boxes"].shape == (k, 4) and pred["masks"].shape == (k, 1, h, w)
        if k:  # in the input image's pixels: nothing in the padding
            assert pred["boxes"][:, 2].max() <= w and pred["boxes"][:, 3].max() <= h


def test_an_image_without_instances_trains():
    """Images without annotations are kept as negatives: no mask or box target, finite losses."""
    torch.manual_seed(0)
    model = small_detector(small_vit(), img_size=64).train()
    sizes = [(64, 56), (48, 64)]
    targets = instance_targets(sizes)
    targets[1] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 48, 64, dtype=torch.uint8),
    }
    losses = model([torch.rand(3, h, w) for h, w in sizes], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_roi_and_proposal_counts_are_the_given_ones():
    model = small_detector(
        small_vit(), num_rois=8, rpn_post_nms_train=20, rpn_post_nms_test=12, detections_per_img=3
    )
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 8
    assert model.rpn.train().post_nms_top_n() == 20
    assert model.rpn.eval().post_nms_top_n() == 12
    model.eval()
    with torch.no_grad():
        preds = model([torch.rand(3, 64, 64)])
    assert len(preds[0]["boxes"]) == 3  # 10 (the helper's default) without the flag
    default = build_detector(
        small_vit(), num_classes=3, img_size=64, image_mean=MEAN, image_std=STD
    )
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert default.rpn.train().post_nms_top_n() == 1000


def test_box_coordinates_stay_fp32_under_bf16_autocast():
    """Layers run in bf16, but anchors, proposals and boxes are fp32 (bf16 coordinates would be
    4-8 px coarse at 512-2048 px)."""
    torch.manual_seed(0)
    model = small_detector(small_vit(), img_size=64)
    sizes = [(64, 56), (48, 64)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(torch.rand(1, 3, 64, 64))
        losses = model(images, instance_targets(sizes))
        model.eval()
        with torch.no_grad():
            preds = model(images)
    assert all(f.dtype == torch.float32 for f in feats.values())
    assert all(torch.isfinite(v) for v in losses.values())
    for pred in preds:
        assert len(pred["boxes"]) > 0
        assert pred["boxes"].dtype == pred["scores"].dtype == pred["masks"].dtype == torch.float32


def test_transform_pads_to_the_square_and_never_resizes():
    t = PadOnlyTransform(64, list(MEAN), list(STD))
    images, _ = t([torch.full((3, 40, 64), 0.5), torch.full((3, 64, 20), 0.75)])
    assert images.tensors.shape == (2, 3, 64, 64)
    assert images.image_sizes == [(40, 64), (64, 20)]
    assert images.tensors[0, :, :40].abs().max() == 0  # (0.5 - 0.5) / 0.25
    assert torch.allclose(images.tensors[1, :, :, :20], torch.tensor(1.0))
    assert images.tensors[1, :, :, 20:].abs().max() == 0  # padded
    with pytest.raises(ValueError, match="larger than its 64x64"):
        t([torch.rand(3, 65, 64)])


def test_layer_decay_groups():
    model = small_detector(small_vit(), img_size=64)
    top = DEPTH + 1
    assert model.num_layers == DEPTH + 2
    assert model.layer_id("backbone.encoder.pos_embed") == 0
    assert model.layer_id("backbone.encoder.patch_embed.proj.weight") == 0
    assert model.layer_id("backbone.encoder.blocks.2.attn.qkv.weight") == 3
    assert model.layer_id("backbone.encoder.blocks.2.attn.rel_pos_h") == 3
    assert model.layer_id("backbone.pyramid.scale2.weight") == top
    assert model.layer_id("roi_heads.box_predictor.cls_score.weight") == top
    groups = layer_decay_groups(model, 0.1, 0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["backbone.encoder.pos_embed"])] == (0.5**top, 0.0)
    assert scale[id(params["backbone.encoder.blocks.0.norm1.weight"])] == (0.5**DEPTH, 0.0)
    assert scale[id(params["backbone.encoder.blocks.3.attn.qkv.weight"])] == (0.5, 0.1)
    assert scale[id(params["rpn.head.cls_logits.weight"])] == (1.0, 0.1)
    assert len(scale) == sum(p.requires_grad for p in model.parameters())
    conv = small_detector(small_convvit(), img_size=64)
    assert conv.num_layers == 2 + 4
    assert conv.layer_id("backbone.encoder.patch_embed1.proj.weight") == 0
    assert conv.layer_id("backbone.encoder.blocks.1.mlp.fc1.weight") == 4
    assert conv.layer_id("backbone.outputs.0.0.weight") == 5


def test_drop_path_rises_to_the_given_rate():
    model = small_detector(small_vit(), img_size=64, drop_path=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.backbone.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="img_size 60"):
        small_detector(small_vit(), img_size=60)
    with pytest.raises(ValueError, match="global_blocks must lie in"):
        small_detector(small_vit(), global_blocks=(4,))
    with pytest.raises(ValueError, match="num_classes"):
        build_detector(small_vit(), num_classes=1, img_size=64, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="for ViT encoders only"):
        small_detector(small_convvit(), global_blocks=(0,))
    assert isinstance(small_detector(small_vit()).backbone, ViTDetBackbone)
