"""Import of the official MAE and CMAE checkpoint layouts.

No official weights can be downloaded in tests, so the state dicts are SYNTHETIC: random tensors
under exactly the key names and shapes those codebases save, written out by hand (tests/helpers.py)
for a small configuration (ViT-Tiny width 192 x 12 blocks, 32 px, patch 8, decoders 32 wide):

- MAE, facebookresearch/mae ``models_mae.py`` (timm blocks), saved as ``{"model": state}``;
- CMAE, github.com/ZhichengHuang/CMAE (mmengine): its model's attributes ``backbone``,
  ``target_backbone`` (no final norm), ``pixel_decoder``, ``feature_decoder``, ``projector``,
  ``target_projector``, ``head.predictor``, mm layer names, saved as ``{"state_dict": state}``.

Patch 8 makes p*p*3 = 192 = the width: the official feature decoder outputs p*p*3 values and
its projector takes them, which only fits our encoder-width feature decoder when they agree
(as for ViT-B/16, 768 = 16*16*3).
"""

import re

import pytest
import timm
import torch

from cmae.cli import main
from cmae.data.views import normalize
from cmae.interop.export import bgr_to_rgb_patch_embed, load_model, load_official
from cmae.models.cmae import unpatchify
from cmae.runtime.checkpoint import CheckpointError
from tests.helpers import (
    DD,
    DEC_DEPTH,
    DEPTH,
    FEAT_DEPTH,
    MEAN,
    PH,
    PO,
    STD,
    D,
    L,
    P,
    cmae_shapes,
    mae_encoder_shapes,
    mae_shapes,
    mm_vit,
    synthetic,
    timm_from_file,
)

# our name -> official name, for one representative of every distinct parameter kind
MAE_PAIRS = {
    "encoder.cls_token": "cls_token",
    "encoder.pos_embed": "pos_embed",
    "encoder.patch_embed.proj.weight": "patch_embed.proj.weight",
    "encoder.blocks.11.mlp.fc2.weight": "blocks.11.mlp.fc2.weight",
    "encoder.norm.bias": "norm.bias",
    "pixel_decoder.mask_token": "mask_token",
    "pixel_decoder.pos_embed": "decoder_pos_embed",
    "pixel_decoder.embed.weight": "decoder_embed.weight",
    "pixel_decoder.blocks.1.attn.qkv.bias": "decoder_blocks.1.attn.qkv.bias",
    "pixel_decoder.norm.weight": "decoder_norm.weight",
    "pixel_decoder.pred.bias": "decoder_pred.bias",
}
BLOCK_PAIRS = {  # timm Block name: mm TransformerEncoderLayer name
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn.layers.0.0.weight",
    "mlp.fc1.bias": "ffn.layers.0.0.bias",
    "mlp.fc2.weight": "ffn.layers.1.weight",
    "mlp.fc2.bias": "ffn.layers.1.bias",
}
CMAE_PAIRS = {
    "encoder.cls_token": "backbone.cls_token",
    "encoder.pos_embed": "backbone.pos_embed",
    "encoder.patch_embed.proj.weight": "backbone.patch_embed.projection.weight",
    "encoder.patch_embed.proj.bias": "backbone.patch_embed.projection.bias",
    "encoder.norm.weight": "backbone.ln1.weight",
    "target_encoder.cls_token": "target_backbone.cls_token",
    "target_encoder.patch_embed.proj.weight": "target_backbone.patch_embed.projection.weight",
    "pixel_decoder.mask_token": "pixel_decoder.mask_token",
    "pixel_decoder.pos_embed": "pixel_decoder.decoder_pos_embed",
    "pixel_decoder.embed.weight": "pixel_decoder.decoder_embed.weight",
    "pixel_decoder.norm.weight": "pixel_decoder.ln1.weight",
    "pixel_decoder.pred.weight": "pixel_decoder.decoder_pred.weight",
    "feature_decoder.mask_token": "feature_decoder.mask_token",
    "feature_decoder.norm.bias": "feature_decoder.ln1.bias",
    "feature_decoder.pred.bias": "feature_decoder.decoder_pred.bias",
    "projector.0.weight": "projector.fc0.weight",
    "projector.1.running_var": "projector.bn0.running_var",
    "projector.1.num_batches_tracked": "projector.bn0.num_batches_tracked",
    "projector.3.weight": "projector.fc1.weight",
    "target_projector.1.running_mean": "target_projector.bn0.running_mean",
    "predictor.0.bias": "head.predictor.fc0.bias",
    "predictor.3.weight": "head.predictor.fc1.weight",
}
for _ours, _theirs in BLOCK_PAIRS.items():
    CMAE_PAIRS[f"encoder.blocks.0.{_ours}"] = f"backbone.layers.0.{_theirs}"
    CMAE_PAIRS[f"target_encoder.blocks.11.{_ours}"] = f"target_backbone.layers.11.{_theirs}"
    CMAE_PAIRS[f"pixel_decoder.blocks.1.{_ours}"] = f"pixel_decoder.decoder_blocks.1.{_theirs}"
    CMAE_PAIRS[f"feature_decoder.blocks.0.{_ours}"] = f"feature_decoder.decoder_blocks.0.{_theirs}"


def assert_pairs(model, official, pairs):
    ours = model.state_dict()
    for k, theirs in pairs.items():
        assert torch.equal(ours[k], official[theirs]), k


def test_mae_layout_full_match():
    official = synthetic(mae_shapes())
    res = load_official({"model": official}, "mae")
    assert res.missing == [] and res.unexpected == [] and res.derived == []
    m = res.config.model
    assert (m.method, m.encoder, m.img_size, m.patch_size) == ("mae", "vit_tiny", 32, 8)
    assert (m.decoder_dim, m.decoder_depth) == (DD, DEC_DEPTH)
    assert_pairs(res.model, official, MAE_PAIRS)
    n_ours = sum(v.numel() for v in res.model.state_dict().values())
    assert n_ours == sum(v.numel() for v in official.values())
    # MAE's encoder names are timm's: timm on the official encoder keys gives the same tokens
    vit = timm.create_model(
        "vit_base_patch16_224", img_size=32, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=3
    )
    vit.reset_classifier(0)
    vit.load_state_dict({k: official[k] for k in mae_encoder_shapes()}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            res.model.encoder.eval()(x), vit.eval().forward_features(x), atol=1e-5
        )
        out = res.model(x)
    assert torch.isfinite(out.loss) and out.pred.shape == (2, L, P * P * 3)


def test_cmae_layout_full_match_and_forward():
    official = synthetic(cmae_shapes())
    res = load_official({"state_dict": official, "author": "CMAE"}, "cmae")
    assert res.missing == [] and res.unexpected == []
    # the official target encoder has no final norm; ours carries an unused copy
    assert res.derived == ["target_encoder.norm.weight", "target_encoder.norm.bias"]
    m = res.config.model
    assert (m.method, m.encoder, m.feature_decoder_depth) == ("cmae", "vit_tiny", FEAT_DEPTH)
    assert (m.proj_hidden_dim, m.proj_dim) == (PH, PO)
    assert_pairs(res.model, official, CMAE_PAIRS)
    sd = res.model.state_dict()
    assert torch.equal(sd["target_encoder.norm.weight"], official["backbone.ln1.weight"])
    n_derived = sum(sd[k].numel() for k in res.derived)
    n_ours = sum(v.numel() for v in sd.values())
    assert n_ours == sum(v.numel() for v in official.values()) + n_derived
    x = torch.randn(4, 3, 32, 32)
    out = res.model(x, x.flip(-1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.q.shape == out.k.shape == (4, PO)


def test_strict_import_names_unexpected_and_missing_keys():
    official = synthetic(mae_shapes())
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma"):
        load_official({"model": {**official, "blocks.0.ls1.gamma": torch.ones(D)}}, "mae")
    extra = {"model": {**official, "blocks.0.ls1.gamma": torch.ones(D)}}
    assert load_official(extra, "mae", strict=False).unexpected == ["blocks.0.ls1.gamma"]
    del official["decoder_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['pixel_decoder\.norm\.weight'\]"):
        load_official({"model": official}, "mae")
    cmae = synthetic(cmae_shapes())
    cmae["backbone.layers.0.gamma_1"] = torch.ones(D)  # layer scale: not in the reference ViT
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.gamma_1"):
        load_official({"state_dict": cmae}, "cmae")
    res = load_official({"state_dict": cmae}, "cmae", strict=False)
    assert res.unexpected == ["backbone.layers.0.gamma_1"]


def test_mismatched_shapes_are_an_error():
    # official feature decoders output p*p*3 values; with patch 8 and width 192 that fits ours,
    # a wrong projector input width does not
    official = synthetic(cmae_shapes())
    official["projector.fc0.weight"] = torch.zeros(PH, 48)
    with pytest.raises(CheckpointError, match=r"projector\.0\.weight"):
        load_official({"state_dict": official}, "cmae")


def test_encoder_only_files():
    # the released MAE encoder (mae_pretrain_vit_*.pth) and CMAE's extract_backbone_weights.py
    mae_enc = synthetic(mae_encoder_shapes())
    with pytest.raises(CheckpointError, match="pixel_decoder"):
        load_official({"model": mae_enc}, "mae")
    res = load_official({"model": mae_enc}, "mae", strict=False)
    assert res.missing and all(k.startswith("pixel_decoder.") for k in res.missing)
    assert torch.equal(res.model.encoder.cls_token, mae_enc["cls_token"])

    backbone = {k[len("backbone.") :]: v for k, v in synthetic(mm_vit("backbone.", True)).items()}
    res = load_official({"state_dict": backbone, "author": "CMAE"}, "cmae", strict=False)
    assert res.unexpected == []
    sd = res.model.state_dict()
    assert torch.equal(
        sd["encoder.blocks.3.mlp.fc1.weight"], backbone["layers.3.ffn.layers.0.0.weight"]
    )
    # the absent target branch starts as a copy of the online one, as at initialisation
    assert torch.equal(
        sd["target_encoder.blocks.3.mlp.fc1.weight"], sd["encoder.blocks.3.mlp.fc1.weight"]
    )
    assert torch.equal(sd["target_projector.0.weight"], sd["projector.0.weight"])


def test_bgr_to_rgb_patch_embed_is_exact():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(D, 3, P, P, generator=g), torch.randn(D, generator=g)
    img = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    # the official pipeline: RGB image swapped to B,G,R, then normalised with the RGB stats
    official_in = normalize(img[:, [2, 1, 0]], MEAN, STD)
    ref = torch.nn.functional.conv2d(official_in, weight, bias, stride=P)
    w2, b2 = bgr_to_rgb_patch_embed(weight, bias, MEAN, STD)
    ours = torch.nn.functional.conv2d(normalize(img, MEAN, STD), w2, b2, stride=P)
    assert torch.allclose(ours, ref, atol=1e-4)
    assert not torch.allclose(
        torch.nn.functional.conv2d(normalize(img, MEAN, STD), weight, bias, stride=P),
        ref,
        atol=1e-2,
    )


def test_bgr_option_flips_the_imported_encoders():
    official = synthetic(cmae_shapes())
    plain = load_official({"state_dict": official}, "cmae").model.eval()
    flipped = load_official({"state_dict": official}, "cmae", bgr_to_rgb=True).model.eval()
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for enc in ("encoder", "target_encoder"):
            ref = getattr(plain, enc)(normalize(img[:, [2, 1, 0]], MEAN, STD))
            got = getattr(flipped, enc)(normalize(img, MEAN, STD))
            assert torch.allclose(got, ref, atol=1e-4), enc


def test_import_cli_writes_a_checkpoint_the_other_commands_read(tmp_path, capsys):
    src = tmp_path / "official.pth"
    torch.save({"state_dict": synthetic(cmae_shapes()), "author": "CMAE"}, src)
    out = tmp_path / "imported.pt"
    assert main(["import-official", str(src), "--layout", "cmae", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "B,G,R" in text and "0 missing, 0 unexpected, 2 derived" in text
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["model"]["encoder"] == "vit_tiny" and "model" in ckpt
    assert main(["export", str(out), "--out", str(tmp_path / "enc.safetensors")]) == 0
    assert main(["import-official", str(src), "--layout", "mae", "--out", str(out)]) == 2
    assert "wrong --layout" in capsys.readouterr().err


def shallow(shapes, depth):
    """``shapes`` with the encoders cut to ``depth`` blocks (a size that is no preset)."""
    keep = {}
    for k, s in shapes.items():
        m = re.match(r"(?:target_)?backbone\.layers\.(\d+)\.", k)
        if m is None or int(m.group(1)) < depth:
            keep[k] = s
    return keep


def test_any_vit_size_imports_heads_from_rule_config_or_override():
    official = synthetic(shallow(cmae_shapes(), 4))
    res = load_official({"state_dict": official}, "cmae")
    m = res.config.model
    assert (m.encoder, m.img_size, m.patch_size, m.decoder_dim) == ("vit_192x4h3", 32, P, DD)
    assert (m.decoder_depth, m.feature_decoder_depth, m.decoder_heads) == (DEC_DEPTH, 1, 16)
    assert res.model.encoder.blocks[0].attn.num_heads == 3  # width / 64
    assert len(res.model.encoder.blocks) == 4
    # an mmengine config dict in the checkpoint names the heads
    cfg = {"model": {"backbone": {"arch": {"embed_dims": D, "num_heads": 6}}}}
    cfg["model"]["neck"] = {"decoder_num_heads": 4}
    res = load_official({"state_dict": official, "meta": {"cfg": cfg}}, "cmae")
    assert (res.config.model.encoder, res.config.model.decoder_heads) == ("vit_192x4h6", 4)
    assert res.model.pixel_decoder.blocks[0].attn.num_heads == 4
    # the caller overrides both
    res = load_official(
        {"state_dict": official, "meta": {"cfg": cfg}}, "cmae", encoder_heads=12, decoder_heads=8
    )
    assert (res.config.model.encoder, res.config.model.decoder_heads) == ("vit_192x4h12", 8)
    with pytest.raises(CheckpointError, match="encoder_heads"):
        load_official({"state_dict": official}, "cmae", encoder_heads=5)
    # a preset shape keeps the preset name and heads
    assert load_official({"model": synthetic(mae_shapes())}, "mae").config.model.encoder == (
        "vit_tiny"
    )


def test_custom_size_import_round_trips_through_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "official.pth"
    torch.save({"state_dict": synthetic(shallow(cmae_shapes(), 4))}, src)
    out = tmp_path / "imported.pt"
    assert main(["import-official", str(src), "--layout", "cmae", "--out", str(out)]) == 0
    assert "vit_192x4h3" in capsys.readouterr().out
    model, cfg = load_model(out)
    assert cfg.model.encoder == "vit_192x4h3" and len(model.encoder.blocks) == 4
    enc = tmp_path / "enc.safetensors"
    assert main(["export", str(out), "--out", str(enc)]) == 0
    vit = timm_from_file(enc)
    assert len(vit.blocks) == 4 and vit.blocks[0].attn.num_heads == 3


def test_bgr_to_rgb_reconstruction_equals_the_official_on_the_bgr_image():
    """Official order: the model fed the B,G,R image (normalised with the RGB statistics, as
    the official pipeline does) predicts B,G,R per pixel. Imported with bgr_to_rgb: fed the RGB
    image, it predicts the same values with the channels in R,G,B order."""
    official = synthetic(shallow(cmae_shapes(), 4))
    plain = load_official({"state_dict": official}, "cmae").model.eval()
    rgb = load_official({"state_dict": official}, "cmae", bgr_to_rgb=True).model.eval()
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.manual_seed(1)
    noise = torch.rand(2, L)  # the same mask for both
    with torch.no_grad():
        ids_keep, ids_restore = mask_ids(noise)
        pred_bgr = plain.pixel_decoder(
            plain.encoder(normalize(img[:, [2, 1, 0]], MEAN, STD), ids_keep), ids_restore
        )
        pred_rgb = rgb.pixel_decoder(rgb.encoder(normalize(img, MEAN, STD), ids_keep), ids_restore)
    # [N, L, p*p*3] channels last -> images; the official one read as B,G,R
    recon_official = unpatchify(pred_bgr, P)[:, [2, 1, 0]]
    recon_ours = unpatchify(pred_rgb, P)
    torch.testing.assert_close(recon_ours, recon_official, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unpatchify(pred_bgr, P), recon_ours, atol=1e-2)


def mask_ids(noise):
    keep = noise.shape[1] // 4
    ids_shuffle = noise.argsort(dim=1)
    return ids_shuffle[:, :keep], ids_shuffle.argsort(dim=1)
