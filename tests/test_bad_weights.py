"""Wrong-shaped, missing or unknown weights: `cmae knn / linprobe / finetune / export` and
`train.resume=FILE` exit 2 with one line naming the file, the key and expected vs found shape
(no traceback, nothing written)."""

import pytest
import torch
from safetensors.torch import save_file

from cmae.cli import main
from cmae.config import load_config, to_dict
from cmae.models.cmae import build_model
from tests.helpers import tiny_overrides

DATA = [
    "data.synthetic_train=16",
    "data.synthetic_val=8",
    "data.synthetic_size=16",
    "data.num_workers=0",
]
QKV = "blocks.0.attn.qkv.weight"  # vit_tiny width 192: [576, 192]


def training_checkpoint(path, edit) -> None:
    """A `cmae pretrain` checkpoint of the tiny test model, with ``edit(model_state, config)``
    applied."""
    cfg = load_config(None, tiny_overrides())
    model = build_model(cfg.model)
    state, config = model.state_dict(), to_dict(cfg)
    edit(state, config)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "step": 1,
            "epoch": 0,
            "config": config,
            "rng": [],
            "scaler": None,
            "bad_images": [0, 0],
        },
        path,
    )


def mis_shape(state, config):
    state[f"encoder.{QKV}"] = torch.zeros(576, 190)


def non_square_pos(state, config):
    state["encoder.pos_embed"] = torch.zeros(1, 20, 192)  # 19 positions


def no_pos(state, config):
    del state["encoder.pos_embed"]


def unknown_encoder(state, config):
    config["model"]["encoder"] = "nope"


CASES = {
    "mis_shape": (mis_shape, [QKV, "[576, 190]", "[576, 192]"]),
    "non_square_pos": (non_square_pos, ["pos_embed", "[1, 20, 192]", "[1, 17, 192]"]),
    "no_pos": (no_pos, ["pos_embed is missing", "[1, 17, 192]"]),
    "unknown_encoder": (unknown_encoder, ["unknown encoder 'nope'"]),
}


def one_line_error(capsys, rc, path, expected):
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and all(s in lines[0] for s in expected), lines[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_eval_commands(tmp_path, capsys, case, command):
    edit, expected = CASES[case]
    path = tmp_path / "checkpoint.pt"
    training_checkpoint(path, edit)
    rc = main([command, "--checkpoint", str(path), "--out", str(tmp_path / "o"), *DATA])
    one_line_error(capsys, rc, path, expected)


@pytest.mark.parametrize("case", CASES)
def test_export_refuses(tmp_path, capsys, case):
    edit, expected = CASES[case]
    path, out = tmp_path / "checkpoint.pt", tmp_path / "enc.safetensors"
    training_checkpoint(path, edit)
    rc = main(["export", str(path), "--out", str(out)])
    one_line_error(capsys, rc, path, expected if case != "unknown_encoder" else ["nope"])
    assert not out.exists()


@pytest.mark.parametrize("case", ["mis_shape", "non_square_pos", "no_pos"])
def test_resume_from_file(tmp_path, capsys, case):
    edit, expected = CASES[case]
    path = tmp_path / "checkpoint.pt"
    training_checkpoint(path, edit)
    args = ["pretrain", "--out", str(tmp_path / "run"), *tiny_overrides(), *DATA]
    rc = main([*args, "train.batch_size=4", "train.max_steps=2", f"train.resume={path}"])
    one_line_error(capsys, rc, path, expected)


def test_safetensors_encoder_with_bad_shapes(tmp_path, capsys):
    cfg = load_config(None, tiny_overrides())
    enc = {
        k[len("encoder.") :]: v
        for k, v in build_model(cfg.model).state_dict().items()
        if k.startswith("encoder.")
    }
    for name, edit, expected in [
        ("qkv", {QKV: torch.zeros(576, 190)}, [QKV, "[576, 190]", "[576, 192]"]),
        ("pos", {"pos_embed": torch.zeros(1, 20, 192)}, ["pos_embed", "[1, 20, 192]", "square"]),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file({**enc, **edit}, str(path), metadata={"encoder": "vit_tiny"})
        rc = main(["knn", "--checkpoint", str(path), "--out", str(tmp_path / "o"), *DATA])
        one_line_error(capsys, rc, path, expected)
    path = tmp_path / "nopos.safetensors"
    save_file({k: v for k, v in enc.items() if k != "pos_embed"}, str(path))
    rc = main(["knn", "--checkpoint", str(path), "--out", str(tmp_path / "o"), *DATA])
    one_line_error(capsys, rc, path, ["pos_embed is missing"])
