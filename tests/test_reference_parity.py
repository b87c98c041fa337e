"""Pinned to the official CMAE code (github.com/ZhichengHuang/CMAE, mmselfsup-based):
projector / predictor BatchNorm eps, their Linear init, the weight-decay exemptions and the
sin-cos position embedding layout."""

import math

import torch
from torch import nn

from cmae.interop.export import load_official, rename_official
from cmae.models.cmae import CMAE
from cmae.models.vit import sincos_pos_embed
from cmae.runtime.optim import param_groups
from tests.helpers import cmae_shapes, synthetic

# mmengine paramwise_cfg custom_keys of the official pretraining config (decay_mult=0); a key
# matches when it is a substring of the parameter's full name
REFERENCE_NO_DECAY = ("ln", "bias", "pos_embed", "mask_token", "cls_token")


def small_cmae(**kw) -> CMAE:
    torch.manual_seed(0)
    return CMAE(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        proj_hidden_dim=256,
        proj_dim=64,
        **kw,
    )


def test_projector_and_predictor_batchnorm_eps_is_the_reference():
    m = small_cmae()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm1d)]
    assert len(bns) == 3  # projector, predictor, target projector
    assert all(bn.eps == 1e-6 for bn in bns)


def test_projector_and_predictor_keep_pytorch_default_linear_init():
    """kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in),
    and a non-zero uniform bias; not xavier (std sqrt(2 / (fan_in + fan_out))) with zero bias."""
    m = small_cmae()
    for head in (m.projector, m.predictor):
        for lin in (head[0], head[3]):
            fan_in, fan_out = lin.in_features, lin.out_features
            bound = 1 / math.sqrt(fan_in)
            w = lin.weight.detach()
            assert w.abs().max() <= bound
            # within 5 % of kaiming's std; xavier's differs by 9 % or more at these shapes
            assert abs(w.std().item() * math.sqrt(3) / bound - 1) < 0.05
            xavier_std = math.sqrt(2 / (fan_in + fan_out))
            assert abs(xavier_std * math.sqrt(3) / bound - 1) > 0.08
        b = head[0].bias.detach()
        assert b.abs().max() <= 1 / math.sqrt(head[0].in_features) and b.abs().min() > 0
        assert head[3].bias is None
    # the rest keeps MAE's init: xavier weights, zero biases
    assert torch.count_nonzero(m.pixel_decoder.embed.bias) == 0
    assert torch.count_nonzero(m.encoder.blocks[0].attn.qkv.bias) == 0


def test_weight_decay_exemptions_match_the_reference_rule():
    """Apply the official custom_keys to the official names of every trainable parameter and
    compare with our groups: BN weights decayed, LayerNorms / biases / tokens not."""
    official = synthetic(cmae_shapes())
    model = load_official({"state_dict": official}, "cmae").model
    _, origin, _ = rename_official(official, "cmae")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    ours_nd = {names[id(p)] for p in no_decay["params"]}
    ours_d = {names[id(p)] for p in decay["params"]}
    ref_nd = {n for n in ours_nd | ours_d if any(k in origin[n] for k in REFERENCE_NO_DECAY)}
    assert ours_nd == ref_nd
    assert "projector.1.weight" in ours_d and "predictor.1.weight" in ours_d  # BN weight
    assert "encoder.norm.weight" in ours_nd and "encoder.blocks.0.norm1.weight" in ours_nd
    assert "pixel_decoder.mask_token" in ours_nd and "encoder.cls_token" in ours_nd
    assert "projector.1.bias" in ours_nd
    # the old rule, kept as train.wd_exempt=1d: every 1-D parameter exempt
    d1, nd1 = param_groups(model, 0.05, "1d")
    assert {names[id(p)] for p in nd1["params"]} == ours_nd | {
        "projector.1.weight",
        "predictor.1.weight",
    }


def mmselfsup_sincos(grid: int, dim: int) -> torch.Tensor:
    """The official layout, written from its description: meshgrid(ij) over (w, h) ranges, so
    for raster token k = r * grid + c the first half is built from r, the second from c."""
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    a, b = rows[:, None] * omega, cols[:, None] * omega
    emb = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb]).float()


def test_sincos_layout_is_mae_and_the_official_one_is_the_halves_swapped():
    grid, dim = 4, 32
    ours = sincos_pos_embed(dim, grid)
    official = mmselfsup_sincos(grid, dim)
    assert not torch.allclose(ours, official)
    swapped = torch.cat([official[:, dim // 2 :], official[:, : dim // 2]], dim=1)
    torch.testing.assert_close(ours, swapped)
    # ours: first half encodes the column (tokens 0 and 1 differ there, same row)
    assert not torch.allclose(ours[1, : dim // 2], ours[2, : dim // 2])
    torch.testing.assert_close(ours[1, dim // 2 :], ours[2, dim // 2 :])


def test_imported_position_embeddings_are_kept_as_they_are():
    official = synthetic(cmae_shapes())
    grid, width = 4, official["backbone.pos_embed"].shape[-1]
    official["backbone.pos_embed"] = mmselfsup_sincos(grid, width)[None]
    sd = load_official({"state_dict": official}, "cmae", bgr_to_rgb=True).model.state_dict()
    for theirs, ours in (
        ("backbone.pos_embed", "encoder.pos_embed"),
        ("target_backbone.pos_embed", "target_encoder.pos_embed"),
        ("pixel_decoder.decoder_pos_embed", "pixel_decoder.pos_embed"),
        ("feature_decoder.decoder_pos_embed", "feature_decoder.pos_embed"),
    ):
        assert torch.equal(sd[ours], official[theirs]), ours
    assert not torch.allclose(sd["encoder.pos_embed"][0], sincos_pos_embed(width, grid))
