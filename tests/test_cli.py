import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cmae.cli import main
from cmae.config import load_config
from tests.helpers import small_run_args


def test_pretrain_cli_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    assert main(small_run_args(out)) == 0
    for name in (
        "config.yaml",
        "log.jsonl",
        "checkpoint.pt",
        "encoder.safetensors",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3]
    # the quick preset's monitor: one check at the end of its (only, truncated) epoch
    assert [r["step"] for r in records if "knn_top1" in r] == [3]
    for key in (
        "step",
        "epoch",
        "loss",
        "loss_pixel",
        "loss_contrast",
        "lr",
        "momentum",
        "img_per_s",
    ):
        assert key in lines[0]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and "optimizer" in ckpt
    assert any(k.startswith("target_encoder.") for k in ckpt["model"])
    assert ckpt["config"]["model"]["img_size"] == 16
    enc = load_file(out / "encoder.safetensors")
    assert "cls_token" in enc and "blocks.0.attn.qkv.weight" in enc
    assert not any(k.startswith("encoder.") for k in enc)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["knn"]["top1"] <= 100 and "knn_random_init" in summary
    saved = load_config(str(out / "config.yaml"))
    assert saved.train.max_steps == 3 and saved.model.img_size == 16


def test_pretrain_mae_preset(tmp_path):
    out = tmp_path / "mae"
    assert (
        main(
            ["pretrain", "--config", "mae_tiny", "--out", str(out)]
            + small_run_args(out)[3:]
            + ["train.knn_at_end=false"]
        )
        == 0
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("target_") for k in ckpt["model"])
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["loss_contrast"] == 0.0
    assert not (out / "summary.json").read_text().count("knn")


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path), "model.mask_ratio=2"]) == 2
    err = capsys.readouterr().err
    assert "model.mask_ratio" in err and "error" in err


def test_cli_reports_missing_data(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batch_larger_than_data_is_an_error(tmp_path, capsys):
    args = small_run_args(tmp_path / "r") + ["train.batch_size=128"]
    assert main(args) == 2
    assert "train.batch_size" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cmae", "pretrain", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--data" in proc.stdout


def test_overrides_may_follow_options():
    from cmae.cli import parse_args

    args = parse_args(
        ["finetune", "--checkpoint", "random", "encoder.preset=tiny", "--data", "D", "epochs=4"]
    )
    assert args.overrides == ["encoder.preset=tiny", "epochs=4"] and args.data == "D"
    args = parse_args(["pretrain", "train.epochs=2", "--out", "O", "model.mask_ratio=0.5"])
    assert args.overrides == ["train.epochs=2", "model.mask_ratio=0.5"] and args.out == "O"
    for bad in (
        ["pretrain", "--bogus"],
        ["knn", "--checkpoint", "random", "k=3", "--out", "O", "x"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
