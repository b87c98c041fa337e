"""Hand-off exports: the timm / Hugging Face folder, ONNX, and encoders at another image size."""

import json
import sys

import pytest
import timm
import torch

from cmae import load_encoder
from cmae.cli import main
from cmae.config import ConfigError, load_config, to_dict
from cmae.interop.encoders import at_img_size, load_encoder_weights
from cmae.interop.hf import CONFIG_NAME, WEIGHTS_NAME, export_hf, push_to_hub
from cmae.models.cmae import build_model
from cmae.runtime.checkpoint import CheckpointError, save_checkpoint
from tests.helpers import tiny_overrides

# a 2-block ViT of width 64: every path below runs in well under a second
SMALL = {"model.encoder": "vit_64x2h2", "data.mean": [0.5, 0.4, 0.3], "data.std": [0.2, 0.3, 0.4]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config(None, tiny_overrides(**SMALL))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))  # pos-embed too: no longer the sin-cos one
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def images(n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_hf_folder_loads_in_timm_by_itself(ckpt, tmp_path, pool):
    out = export_hf(ckpt, tmp_path / "hf", pool=pool)
    assert {p.name for p in out.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # the preprocessing comes with it: timm's data config is the pretraining one
    data = timm.data.resolve_data_config(model=vit)
    assert data["input_size"] == (3, 16, 16)
    assert data["mean"] == [0.5, 0.4, 0.3] and data["std"] == [0.2, 0.3, 0.4]
    enc = load_encoder(ckpt, pool=pool)
    img = images()
    x = (img.float() / 255 - torch.tensor(data["mean"])[:, None, None]) / torch.tensor(data["std"])[
        :, None, None
    ]
    with torch.no_grad():
        theirs, ours = vit(x), enc(img)
    assert theirs.shape == ours.shape == (3, 64)
    assert (theirs - ours).abs().max().item() < 1e-5
    # cmae reads the folder back too
    with torch.no_grad():
        assert torch.allclose(load_encoder(out, pool=pool)(img), ours, atol=1e-6)


def test_hf_folder_at_another_size_equals_load_encoder_resampled(ckpt, tmp_path):
    out = export_hf(ckpt, tmp_path / "hf32", img_size=32)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["model_args"]["img_size"] == 32 and cfg["pretrained_cfg"]["input_size"] == [
        3,
        32,
        32,
    ]
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    enc = load_encoder(ckpt, img_size=32)
    assert torch.equal(vit.pos_embed, enc.vit.pos_embed)
    # and both equal what timm itself does when asked for 32 px from the 16 px weights
    at16 = export_hf(ckpt, tmp_path / "hf16")
    resampled = timm.create_model(f"local-dir:{at16}", pretrained=True, img_size=32)
    assert torch.allclose(resampled.pos_embed, enc.vit.pos_embed, atol=1e-6)
    img = images(size=32)
    with torch.no_grad():
        assert (enc(img) - vit(_norm(img))).abs().max().item() < 1e-5


def _norm(img):
    mean = torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    std = torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    return (img.float() / 255 - mean) / std


def test_load_encoder_img_size_resamples_and_checks(ckpt):
    w = load_encoder_weights(str(ckpt))
    assert at_img_size(w, None) is w and at_img_size(w, 16) is w
    w24 = at_img_size(w, 24)
    assert w24.state["pos_embed"].shape == (1, 1 + 6 * 6, 64) and w24.img_size == 24
    assert torch.equal(w24.state["pos_embed"][:, :1], w.state["pos_embed"][:, :1])
    assert w24.source_id != w.source_id  # the feature cache tells the sizes apart
    enc = load_encoder(ckpt, img_size=24)
    with torch.no_grad():
        assert enc(images(size=24)).shape == (3, 64)
    with pytest.raises(ValueError, match="24x24"):
        enc(images(size=16))
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        load_encoder(ckpt, img_size=18)


def test_hf_export_cli_and_errors(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli_hf"
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out), "--pool", "mean"]) == 0
    assert json.loads((out / CONFIG_NAME).read_text())["global_pool"] == "avg"
    assert "local-dir:" in capsys.readouterr().out  # says how to load it
    # a file where the folder should go
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "afile")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # the Hub push names the missing extra (never reaches the network here)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConfigError, match=r"cmae\[hub\]"):
        push_to_hub(out, "someone/something")


def test_hf_export_refuses_convvit(tmp_path):
    cfg = load_config(None, tiny_overrides(**{"model.encoder": "convvit_tiny"}))
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}, path)
    with pytest.raises(CheckpointError, match="no timm architecture.*--format onnx"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("how", ["dynamo", "torchscript"])
def test_onnx_export_matches_onnxruntime_with_dynamic_batch(ckpt, tmp_path, how):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    if how == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    from cmae.interop.onnx_export import export_onnx

    enc = load_encoder(ckpt, pool="mean")
    out = export_onnx(enc, tmp_path / "enc.onnx", how=how)
    assert [p.name for p in tmp_path.iterdir()] == ["enc.onnx"]  # one file, no temporaries
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["mean"]) == [0.5, 0.4, 0.3] and meta["pool"] == "mean"
    for n in (1, 5):  # traced with 2: the batch axis is free
        x = _norm(images(n, seed=n))
        (theirs,) = session.run(["features"], {"images": x.numpy()})
        with torch.no_grad():
            ours = enc(x)
        assert theirs.shape == (n, 64)
        assert abs(theirs - ours.numpy()).max() < 1e-4


def test_onnx_export_cli_tokens_and_missing_extra(ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "tok.onnx"
    args = ["export", str(ckpt), "--format", "onnx", "--pool", "tokens", "--img-size", "24"]
    assert main([*args, "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (tokens,) = session.run(None, {"images": _norm(images(2, size=24)).numpy()})
    assert tokens.shape == (2, 36, 64)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert main([*args, "--out", str(tmp_path / "x.onnx")]) == 2
    assert "cmae[onnx]" in capsys.readouterr().err
