import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmae import load_encoder
from cmae.cli import main
from cmae.config import ConfigError, to_dict
from cmae.data.views import normalize
from cmae.interop.export import export_full, export_timm
from cmae.runtime.checkpoint import CheckpointError, save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def sources(tmp_path, tiny_cfg, tiny_model):
    """The same trained-looking weights as checkpoint.pt, run dir, timm and full exports."""
    cfg, model = (
        tiny_cfg(**{"data.mean": [0.5, 0.4, 0.3], "data.std": [0.2, 0.3, 0.4]}),
        tiny_model(),
    )
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path / "run"
    ckpt = run / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    return (
        {
            "pt": ckpt,
            "run": run,
            "timm": export_timm(ckpt, tmp_path / "enc.safetensors"),
            "full": export_full(ckpt, tmp_path / "full.safetensors"),
        },
        model,
        cfg,
    )


def test_load_encoder_sources_agree(sources):
    paths, model, cfg = sources
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = normalize(img, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        ref = model.encoder.eval()(x)
        for name, path in paths.items():
            enc = load_encoder(path)
            assert not enc.training and enc.embed_dim == 192
            assert torch.allclose(enc(x), ref[:, 0], atol=1e-6), name
            assert torch.allclose(enc(x, pool="mean"), ref[:, 1:].mean(1), atol=1e-6), name
            assert torch.allclose(enc(x, pool="tokens"), ref[:, 1:], atol=1e-6), name
            # uint8 input is normalised with the pretraining mean/std (kept in every format)
            assert torch.allclose(enc(img), ref[:, 0], atol=1e-5), name


def test_load_encoder_default_pool_and_errors(sources):
    paths = sources[0]
    enc = load_encoder(paths["pt"], pool="mean")
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert enc(img).shape == (2, 192) and enc(img, pool="tokens").shape == (2, 16, 192)
    with pytest.raises(ValueError, match="16x16"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pool"):
        enc(img, pool="max")
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(paths["run"] / "missing.pt")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_encoder("no_such_preset")


def test_load_encoder_preset_is_random_and_seeded():
    a, b, c = load_encoder("quick"), load_encoder("quick"), load_encoder("quick", seed=1)
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a(img), b(img)) and not torch.equal(a(img), c(img))
    assert a(img).shape == (2, 128)


def python_blocks(text):
    # blocks inside list items are indented with the item
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_readme_python_examples_run(tmp_path, monkeypatch, sources):
    blocks = python_blocks(README.read_text())
    assert any("load_encoder" in b for b in blocks), "README lost its Python API example"
    monkeypatch.chdir(tmp_path)  # examples may write files
    # the files the hand-off examples read, made by the commands beside them
    ckpt = str(sources[0]["pt"])
    assert main(["export", ckpt, "--format", "hf", "--out", "vit-cmae"]) == 0
    images = tmp_path / "photos" / "a"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(images / f"{i}.png")
    args = ["--checkpoint", ckpt, "--data", "photos", "--out", "feats.safetensors"]
    assert main(["features", *args, "--workers", "0"]) == 0
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        blocks = [b for b in blocks if "onnxruntime" not in b]
    else:
        assert main(["export", ckpt, "--format", "onnx", "--out", "vit.onnx"]) == 0
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
