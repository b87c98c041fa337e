import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from cmae.cli import main
from cmae.config import ConfigError, from_dict, to_dict
from cmae.interop.export import (
    FORMAT_FULL,
    FORMAT_TIMM,
    export_full,
    export_timm,
    load_model,
    safetensors_metadata,
)
from cmae.models.vit import ViTEncoder
from cmae.runtime.checkpoint import CheckpointError, save_checkpoint
from tests.helpers import timm_from_file


@pytest.fixture
def ckpt(tmp_path, tiny_cfg, tiny_model):
    """A pretraining-style checkpoint of the tiny CMAE with non-initial weights."""
    cfg, model = tiny_cfg(), tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # pos-embed too: export must carry it as is
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg), "step": 3}, path)
    return path, model, cfg


def test_timm_export_loads_in_timm_with_identical_features(ckpt, tmp_path):
    path, model, _ = ckpt
    out = export_timm(path, tmp_path / "enc.safetensors")
    assert safetensors_metadata(out)["format"] == FORMAT_TIMM
    vit = timm_from_file(out)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encoder.eval()(x)
        tokens = vit.forward_features(x)
        pooled = vit(x)  # num_classes=0, global_pool="token": the cls token after the norm
    diff = (ours - tokens).abs().max().item()
    print(f"timm export: max abs feature difference {diff:.3g}")
    assert diff < 1e-5
    assert torch.allclose(pooled, ours[:, 0], atol=1e-5)
    # the same file through timm's plain strict load_state_dict
    kwargs = json.loads(safetensors_metadata(out)["timm_kwargs"])
    plain = timm.create_model("vit_base_patch16_224", num_classes=0, **kwargs).eval()
    plain.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), tokens)


def test_timm_export_resamples_position_embedding(ckpt, tmp_path):
    path, model, _ = ckpt
    out = export_timm(path, tmp_path / "enc32.safetensors", img_size=32)
    meta = safetensors_metadata(out)
    assert meta["img_size"] == "32" and json.loads(meta["timm_kwargs"])["img_size"] == 32
    vit = timm_from_file(out)
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 192)
    # cls position untouched; the grid equals timm's own resampling of the 16 px export
    assert torch.equal(vit.pos_embed[:, :1], model.encoder.pos_embed[:, :1])
    at16 = export_timm(path, tmp_path / "enc16.safetensors")
    timm_resampled = timm_from_file(at16, img_size=32)
    assert torch.allclose(vit.pos_embed, timm_resampled.pos_embed, atol=1e-6)
    # our encoder at the new size loads it strictly and agrees with timm
    enc = ViTEncoder(32, 4, 192, 12, 3)
    enc.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x), vit.forward_features(x), atol=1e-5)


def test_timm_export_rejects_size_not_multiple_of_patch(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="img-size"):
        export_timm(ckpt[0], tmp_path / "x.safetensors", img_size=18)


def test_full_export_round_trip(ckpt, tmp_path):
    path, model, cfg = ckpt
    out = export_full(path, tmp_path / "full.safetensors")
    assert safetensors_metadata(out)["format"] == FORMAT_FULL
    loaded, loaded_cfg = load_model(out)
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert any(k.startswith("target_encoder.") for k in ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert to_dict(loaded_cfg) == to_dict(cfg)
    # the YAML twin is the same config, usable as `cmae pretrain --config`
    assert to_dict(from_dict(yaml.safe_load(out.with_suffix(".yaml").read_text()))) == to_dict(cfg)
    # continue pretraining: a training step runs on the loaded model
    x = torch.randn(4, 3, 16, 16)
    out_ = loaded(x, x.flip(-1))
    out_.loss.backward()
    assert torch.isfinite(out_.loss)


def test_full_loader_refuses_encoder_only_file(ckpt, tmp_path):
    enc = export_timm(ckpt[0], tmp_path / "enc.safetensors")
    with pytest.raises(CheckpointError, match="not a full cmae export"):
        load_model(enc)


def test_export_cli(ckpt, tmp_path, capsys):
    path = ckpt[0]
    assert main(["export", str(path), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert (
        main(["export", str(path), "--out", str(tmp_path / "b.safetensors"), "--format", "full"])
        == 0
    )
    assert (tmp_path / "b.yaml").is_file()
    assert safetensors_metadata(tmp_path / "b.safetensors")["format"] == FORMAT_FULL
    args = ["export", str(path), "--out", str(tmp_path / "c.safetensors"), "--format", "full"]
    assert main(args + ["--img-size", "32"]) == 2
    assert "--img-size" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "d")]) == 2


def test_target_branch_export(ckpt, tmp_path, tiny_cfg, capsys):
    path, model, _ = ckpt
    out = export_timm(path, tmp_path / "target.safetensors", branch="target")
    assert safetensors_metadata(out)["branch"] == "target"
    vit = timm_from_file(out)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = vit.forward_features(x)
        assert torch.allclose(theirs, model.target_encoder.eval()(x), atol=1e-5)
        assert not torch.allclose(theirs, model.encoder.eval()(x), atol=1e-3)  # noised apart
    mae_cfg = tiny_cfg()
    mae_cfg.model.method = "mae"
    from cmae.models.cmae import build_model

    mae_path = tmp_path / "mae.pt"
    state = build_model(mae_cfg.model).state_dict()
    save_checkpoint({"model": state, "config": to_dict(mae_cfg), "step": 1}, mae_path)
    with pytest.raises(CheckpointError, match="no target encoder"):
        export_timm(mae_path, tmp_path / "x.safetensors", branch="target")
    args = ["export", str(path), "--out", str(tmp_path / "f.safetensors"), "--format", "full"]
    assert main(args + ["--branch", "target"]) == 2
    assert "--branch" in capsys.readouterr().err


def test_mae_export_is_mae_layout_and_loads_in_timm(ckpt, tmp_path, capsys):
    path, model, _ = ckpt
    out = tmp_path / "mae.pth"
    assert main(["export", str(path), "--out", str(out), "--format", "mae"]) == 0
    assert "wrote" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert list(state) == ["model"]  # MAE's released files: {"model": encoder state dict}
    enc = model.encoder.state_dict()
    assert set(state["model"]) == set(enc)
    assert all(torch.equal(state["model"][k], enc[k]) for k in enc)
    dim, depth, heads = 192, 12, 3  # vit_tiny
    vit = timm.create_model(
        "vit_base_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
    )
    vit.load_state_dict(state["model"], strict=True)  # timm names, nothing missing or extra
    assert main(["export", str(path), "--out", str(out), "--format", "mae", "--img-size", "32"])
    assert "--img-size" in capsys.readouterr().err
