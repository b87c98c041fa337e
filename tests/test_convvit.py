"""The hybrid ConvViT encoder (cmae.models.convvit): masked convolution, stage shapes, the
CMAE / MAE models built on it, EMA, fine-tuning, and the evaluation / export commands on a
ConvViT run."""

import json

import pytest
import torch

from cmae import load_encoder
from cmae.cli import main
from cmae.config import ConfigError, load_config
from cmae.eval.finetune import freeze_for_partial
from cmae.interop.encoders import EncoderWeights, build_classifier, load_encoder_weights
from cmae.interop.export import FORMAT_CONVVIT, export_encoder, export_timm, safetensors_metadata
from cmae.models import convvit
from cmae.models.cmae import build_encoder, build_model, unpatchify
from cmae.models.convvit import ConvViT, ConvViTClassifier, upsample_mask
from cmae.models.sizes import CONVVIT_SIZES
from cmae.runtime.checkpoint import CheckpointError
from cmae.runtime.optim import layer_decay_groups
from tests.helpers import tiny_overrides

CONVVIT = {"model.encoder": "convvit_tiny"}


def small_convvit(img_size: int = 64, patch_size: int = 16) -> ConvViT:
    torch.manual_seed(0)
    enc = ConvViT(img_size, patch_size, embed_dims=(8, 12, 16), depths=(1, 2, 2), num_heads=2)
    enc.init_weights()
    return enc


def test_stage_shapes_and_strides():
    enc = small_convvit()  # patch 16: strides 4 / 2 / 2, as convvit_base at 224 px
    assert enc.strides == (4, 2, 2) and enc.patch_size == 16 and enc.embed_dim == 16
    x = torch.randn(2, 3, 64, 64)
    f1, f2, f3 = enc.forward_stages(x)
    assert f1.shape == (2, 16, 16, 8) and f2.shape == (2, 8, 8, 12) and f3.shape == (2, 4, 4, 16)
    maps = enc.forward_multiscale(x)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 12, 8, 8), (2, 16, 4, 4)]
    tokens = enc(x)
    assert tokens.shape == (2, 1 + 16, 16)
    # the 1/16 map is the full-image encoder's patch tokens (cls dropped), channels first
    torch.testing.assert_close(maps[2].flatten(2).transpose(1, 2), tokens[:, 1:])
    ids_keep = torch.tensor([[0, 5, 10], [3, 4, 15]])
    assert enc(x, ids_keep).shape == (2, 1 + 3, 16)

    # the 32 px CPU preset: strides 1 / 2 / 2 -> the same 8x8 grid as vit_tiny with patch 4
    cfg = load_config("convvit_tiny")
    tiny = build_encoder(cfg.model)
    assert (cfg.model.img_size, tiny.patch_size, tiny.strides) == (32, 4, (1, 2, 2))
    shapes = [tuple(f.shape) for f in tiny.forward_stages(torch.randn(1, 3, 32, 32))]
    assert shapes == [(1, 32, 32, 64), (1, 16, 16, 96), (1, 8, 8, 192)]
    dims, depths, heads = CONVVIT_SIZES["convvit_base"]
    assert (dims, depths, heads) == ((256, 384, 768), (2, 2, 11), 12)
    assert load_config("convvit_base").model.patch_size == 16


def test_config_accepts_convvit_names_and_checks_the_stride():
    assert load_config(None, tiny_overrides(**CONVVIT)).model.encoder == "convvit_tiny"
    with pytest.raises(ConfigError, match="model.encoder: unknown 'convvit_nano'"):
        load_config(None, tiny_overrides(**{"model.encoder": "convvit_nano"}))
    with pytest.raises(ConfigError, match="model.patch_size: 2 must be a multiple of 4"):
        load_config(None, tiny_overrides(**CONVVIT, **{"model.patch_size": 2}))


def test_upsample_mask_repeats_each_token():
    vis = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    up = upsample_mask(vis, 2)[0, ..., 0]
    assert torch.equal(up, vis[0].repeat_interleave(2, 0).repeat_interleave(2, 1))


def masked_pixels_changed(x: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """x with every pixel of a masked patch replaced by large noise."""
    pix = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p)  # [N, 3, S, S], 1 = masked
    return x + pix * 10 * torch.randn_like(x)


def test_no_information_leak_from_masked_regions(tiny_model, monkeypatch):
    """The CMAE's own masking (2x2 blocks on the token grid): changing the pixels of masked
    patches leaves the online encoder's output for the visible tokens unchanged."""
    model = tiny_model(**CONVVIT, **{"model.img_size": 32}).eval()
    assert model.mask_block == 2 and model.grid == 8
    x = torch.randn(2, 3, 32, 32)

    def encode(imgs):
        torch.manual_seed(7)  # the same masks for both inputs
        latent, mask, _, ids_keep = model.forward_encoder(imgs)
        return latent, mask, ids_keep

    latent, mask, ids_keep = encode(x)
    # 2x2 blocks: every 2x2 group of tokens is all masked or all visible
    blocks = mask.view(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    assert ((blocks == 0).all(-1) | (blocks == 1).all(-1)).all()
    assert 0 < mask.sum() < mask.numel()
    x2 = masked_pixels_changed(x, mask, 4)
    latent2, mask2, _ = encode(x2)
    assert torch.equal(mask, mask2) and latent.shape == (2, 1 + 20, 192)
    torch.testing.assert_close(latent2, latent, atol=1e-6, rtol=0)

    with torch.no_grad():
        # the test is sensitive: the full-image (target) encoder sees the masked pixels in the
        # visible tokens' receptive fields (5x5 depth-wise convs), ...
        full = model.target_encoder(x)
        full2 = model.target_encoder(x2)
        assert not torch.allclose(full, full2, atol=1e-3)
        # ... and so would the online encoder if the conv inputs were not masked
        monkeypatch.setattr(convvit, "_masked", lambda t, visible: t)
        leaky, _, _ = encode(x)
        leaky2, _, _ = encode(x2)
        assert not torch.allclose(leaky, leaky2, atol=1e-3)


@pytest.mark.parametrize("method", ["cmae", "mae"])
def test_tiny_preset_forward_backward(method):
    cfg = load_config("convvit_tiny", [f"model.method={method}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert isinstance(model.encoder, ConvViT)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = model(x, y)
    assert out.pred.shape == (2, 64, 4 * 4 * 3) and out.mask.shape == (2, 64)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert p.grad is None, name
        elif p.requires_grad and name.startswith("encoder."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if method == "cmae":
        assert out.loss_contrast > 0 and out.q.shape == out.k.shape == (2, cfg.model.proj_dim)
    else:
        assert not hasattr(model, "target_encoder") and out.loss_contrast == 0


def test_ema_pairs_every_target_parameter(tiny_model):
    model = tiny_model(**CONVVIT)
    online = dict(model.encoder.named_parameters())
    target = dict(model.target_encoder.named_parameters())
    assert online.keys() == target.keys()
    assert {"patch_embed1.proj.weight", "blocks1.0.dwconv.weight", "blocks.10.attn.qkv.weight"} <= (
        online.keys()
    )
    for name in online:  # target == online at initialisation
        assert torch.equal(online[name], target[name]), name
        assert not target[name].requires_grad
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: t.clone() for n, t in target.items()}
    model.update_target(0.9)
    for name in online:
        torch.testing.assert_close(target[name], 0.9 * before[name] + 0.1 * online[name])


@pytest.fixture
def weights(tiny_cfg) -> EncoderWeights:
    m = tiny_cfg(**CONVVIT).model
    torch.manual_seed(0)
    state = build_encoder(m).state_dict()
    with torch.no_grad():  # "pretrained": not the values a fresh model would have
        for v in state.values():
            v.add_(0.01)
    return EncoderWeights(state, m.encoder, m.img_size, m.patch_size, None, None, "test")


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_finetune_classifier_loads_the_pretrained_encoder(weights, pool):
    model = build_classifier(weights, num_classes=5, pool=pool)
    assert isinstance(model, ConvViTClassifier)
    own = model.state_dict()
    loaded = {k[len("encoder.") :] for k in own if k.startswith("encoder.")}
    fresh = {k for k in own if not k.startswith("encoder.")}
    if pool == "mean":  # the pretrained final norm gives way to a fresh fc_norm (MAE)
        assert loaded == set(weights.state) - {"norm.weight", "norm.bias"}
        assert fresh == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    else:
        assert loaded == set(weights.state) and fresh == {"head.weight", "head.bias"}
    for k in loaded:
        assert torch.equal(own[f"encoder.{k}"], weights.state[k]), k
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert model.head.weight.std() < 1e-4

    broken = weights._replace(state={**weights.state, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="extra.weight"):
        build_classifier(broken, num_classes=5, pool=pool)


def test_finetune_layer_decay_groups_and_partial_training(weights):
    model = build_classifier(weights, num_classes=5)
    depth = len(model.encoder.blocks)
    top = depth + 3  # stage 1, stage 2, stage-3 embedding, blocks, head
    expected_layer = {
        "encoder.patch_embed1.proj.weight": 0,
        "encoder.blocks1.1.dwconv.weight": 0,
        "encoder.patch_embed2.norm.bias": 1,
        "encoder.blocks2.0.mlp.fc1.weight": 1,
        "encoder.patch_embed3.proj.weight": 2,
        "encoder.cls_token": 2,
        "encoder.blocks.0.attn.qkv.weight": 3,
        f"encoder.blocks.{depth - 1}.mlp.fc2.weight": top - 1,
        "fc_norm.weight": top,
        "head.weight": top,
    }
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5):
        for p in group["params"]:
            name = names[id(p)]
            seen[name] = group
            assert group["lr_scale"] == pytest.approx(0.5 ** (top - model.layer_id(name)))
            no_decay = p.ndim <= 1 or name == "encoder.cls_token"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.pos_embed" not in seen  # fixed sin-cos
    for name, layer in expected_layer.items():
        assert model.layer_id(name) == layer, name
        assert seen[name]["lr_scale"] == pytest.approx(0.5 ** (top - layer)), name

    some = build_classifier(weights, num_classes=5, drop_path=0.2)  # reaches every stage
    assert some.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert 0 < some.encoder.blocks1[-1].drop_path.drop_prob < 0.2
    assert isinstance(model.encoder.blocks[-1].drop_path1, torch.nn.Identity)

    freeze_for_partial(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = {n.split(".")[2] for n in trainable if n.startswith("encoder.blocks.")}
    assert blocks == {str(depth - 2), str(depth - 1)}
    assert {n for n in trainable if not n.startswith("encoder.blocks.")} == {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }


# --- commands on a ConvViT pretraining run -----------------------------------------------------

DATA = [
    "data.synthetic_train=16",
    "data.synthetic_val=8",
    "data.synthetic_size=16",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("convvit_run")
    args = [
        "pretrain",
        "--out",
        str(out),
        *tiny_overrides(**CONVVIT),
        *DATA[:3],
        "data.num_workers=0",
        "train.batch_size=8",
        "train.max_steps=1",
        "train.warmup_epochs=1",
        "train.knn_at_end=false",
    ]
    torch.manual_seed(0)
    assert main(args) == 0
    return out


@pytest.mark.slow
def test_eval_export_and_api_on_a_convvit_run(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoint.pt")
    assert safetensors_metadata(run_dir / "encoder.safetensors")["format"] == FORMAT_CONVVIT
    assert main(["knn", "--checkpoint", ckpt, "--out", str(tmp_path / "knn"), *DATA]) == 0
    lp = ["linprobe", "--checkpoint", str(run_dir / "encoder.safetensors")]
    lp += ["--out", str(tmp_path / "lp"), *DATA, "batch_size=8", "epochs=2", "warmup_epochs=1"]
    assert main(lp) == 0
    ft = ["finetune", "--checkpoint", ckpt, "--out", str(tmp_path / "ft"), *DATA]
    assert main(ft + ["batch_size=8", "epochs=1", "warmup_epochs=0", "rand_augment=''"]) == 0
    for name in ("knn", "lp", "ft"):
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert 0 <= res["top1"] <= 100, name

    # export: the encoder's own state dict, with a message saying it is not a timm ViT
    out = tmp_path / "enc.safetensors"
    assert main(["export", ckpt, "--out", str(out)]) == 0
    assert "not a timm VisionTransformer" in capsys.readouterr().out
    meta = safetensors_metadata(out)
    assert meta["format"] == FORMAT_CONVVIT and meta["encoder"] == "convvit_tiny"
    with pytest.raises(CheckpointError, match="not a timm VisionTransformer"):
        export_timm(ckpt, tmp_path / "x.safetensors")
    w = load_encoder_weights(str(out))
    ref = load_encoder_weights(ckpt)
    assert (w.encoder, w.img_size, w.patch_size) == ("convvit_tiny", 16, 4)
    assert w.state.keys() == ref.state.keys()
    assert all(torch.equal(w.state[k], ref.state[k]) for k in ref.state)

    # api: every source gives the trained online encoder
    model_state = torch.load(ckpt, "cpu", weights_only=True)["model"]
    x = torch.randn(2, 3, 16, 16)
    feats = []
    for source in (run_dir, out, run_dir / "encoder.safetensors"):
        enc = load_encoder(source, pool="mean")
        assert isinstance(enc.vit, ConvViT) and enc.embed_dim == 192
        w_dw = enc.vit.blocks1[0].dwconv.weight
        assert torch.equal(w_dw, model_state["encoder.blocks1.0.dwconv.weight"])
        with torch.no_grad():
            feats.append(enc(x))
    assert all(torch.equal(f, feats[0]) for f in feats)
    assert load_encoder("convvit_tiny").img_size == 32  # a preset: random init

    # a larger input size: the fixed sin-cos position embedding is recomputed
    big, fmt = export_encoder(ckpt, tmp_path / "enc32.safetensors", img_size=32)
    assert fmt == FORMAT_CONVVIT
    enc32 = load_encoder(big)
    assert enc32.img_size == 32 and enc32(torch.randn(1, 3, 32, 32)).shape == (1, 192)
